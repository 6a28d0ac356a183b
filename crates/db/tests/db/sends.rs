//! The send state machine: one send per key under concurrency, one claim per submission, one
//! trigger per broadcast window, guarded transitions, expired claims, aggregate state, history.

use std::time::Duration;

use serde_json::json;
use sharpsend_db::sends::{
    self, Claim, Created, Delivery, NewSend, NewSubmission, SendState, Transition, Window,
};
use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::{DatabaseConnection, DbError};

use crate::helpers::{ts, workspace};

const TTL: Duration = Duration::from_secs(60);
const SPACING: Duration = Duration::from_secs(10);

fn new_send(assignment: &str, segments: &[i64]) -> NewSend {
    with_id(&format!("snd_{assignment}"), assignment, segments)
}

fn with_id(public_id: &str, assignment: &str, segments: &[i64]) -> NewSend {
    NewSend {
        public_id: public_id.to_owned(),
        assignment_id: assignment.to_owned(),
        request_id: String::new(),
        title: "Q4".into(),
        subject: "Q4 outlook".into(),
        delivery: Delivery::Broadcast { broadcast_id: 3 },
        request: json!({"assignment": assignment}),
        created_by: "test".into(),
        submissions: segments
            .iter()
            .map(|s| NewSubmission {
                segment_id: *s,
                subject: "Q4 outlook".into(),
                body: "<p>x</p>".into(),
                data: None,
                recipients: json!({"segment": {"id": s}}),
                marker: format!("ss:{public_id}:{s}"),
            })
            .collect(),
    }
}

fn join_error(e: tokio::task::JoinError) -> DbError {
    DbError::Db(sea_orm::DbErr::Custom(e.to_string()))
}

/// `n` tasks over two pools run `f` at once; returns their results.
async fn race<T, F, Fut>(pools: [&DatabaseConnection; 2], n: usize, f: F) -> Result<Vec<T>, DbError>
where
    T: Send + 'static,
    F: Fn(DatabaseConnection, usize) -> Fut,
    Fut: Future<Output = Result<T, DbError>> + Send + 'static,
{
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(n));
    let mut tasks = Vec::new();
    for i in 0..n {
        let fut = f(pools[i % 2].clone(), i);
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            fut.await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.map_err(join_error)??);
    }
    Ok(out)
}

sharpsend_db::db_test!(
    concurrent_creates_of_one_key_record_one_send,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let other = db.connect_again().await?;
        let created = race([&db.conn, &other], 12, move |conn, i| async move {
            sends::create(
                &conn,
                ws,
                &with_id(&format!("snd_try_{i}"), "asg-1", &[4, 5]),
                ts(0),
            )
            .await
        })
        .await?;
        let new: Vec<_> = created
            .iter()
            .filter(|c| matches!(c, Created::New(_)))
            .collect();
        assert_eq!(new.len(), 1, "{created:?}");
        let ids: std::collections::HashSet<i64> = created
            .iter()
            .map(|c| match c {
                Created::New(s) | Created::Existing(s) => s.id,
            })
            .collect();
        assert_eq!(ids.len(), 1);
        let send = sends::get_by_key(&db.conn, ws, "asg-1", "")
            .await?
            .ok_or("no send")?;
        assert_eq!(sends::submissions(&db.conn, send.id).await?.len(), 2);
        assert_eq!(sends::history(&db.conn, send.id).await?.len(), 1);
        // Another request id is another send.
        let mut again = with_id("snd_resend", "asg-1", &[4]);
        again.request_id = "resend".into();
        assert!(matches!(
            sends::create(&db.conn, ws, &again, ts(1)).await?,
            Created::New(_)
        ));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    one_claim_per_submission_and_one_trigger_per_window,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let other = db.connect_again().await?;
        let Created::New(send) =
            sends::create(&db.conn, ws, &new_send("asg-2", &[4, 5]), ts(0)).await?
        else {
            return Err("not new".into());
        };
        let subs = sends::submissions(&db.conn, send.id).await?;
        let window = Some(Window {
            broadcast_id: 3,
            spacing: SPACING,
        });

        // Many dispatchers race for the first submission: one gets it.
        let first = subs[0].id;
        let claims = race([&db.conn, &other], 10, move |conn, i| async move {
            sends::claim(&conn, ws, first, &format!("d{i}"), TTL, window, ts(1)).await
        })
        .await?;
        let claimed: Vec<_> = claims
            .iter()
            .filter(|c| matches!(c, Claim::Claimed(_)))
            .collect();
        assert_eq!(claimed.len(), 1, "{claims:?}");
        let Claim::Claimed(held) = claimed[0] else {
            return Err("claim".into());
        };
        assert_eq!((held.state, held.attempts), (SendState::Submitting, 1));
        assert!(
            claims
                .iter()
                .all(|c| matches!(c, Claim::Claimed(_) | Claim::Gone | Claim::WindowClosed(_)))
        );
        assert_eq!(
            sends::get_by_id(&db.conn, send.id)
                .await?
                .ok_or("send")?
                .state,
            SendState::Submitting
        );

        // The second submission of the same broadcast waits for the window...
        let second = subs[1].id;
        match sends::claim(&db.conn, ws, second, "d0", TTL, window, ts(5)).await? {
            Claim::WindowClosed(opens) => assert_eq!(opens, ts(11)),
            other => return Err(format!("expected the window to be closed, got {other:?}").into()),
        }
        let waiting = sends::submission(&db.conn, second).await?.ok_or("sub")?;
        assert_eq!(
            (waiting.state, waiting.next_attempt_at),
            (SendState::Pending, ts(11))
        );
        // ...a 429 pushes the window later, never earlier...
        sends::hold_window(&db.conn, ws, 3, ts(20)).await?;
        sends::hold_window(&db.conn, ws, 3, ts(12)).await?;
        assert!(
            matches!(sends::claim(&db.conn, ws, second, "d0", TTL, window, ts(15)).await?, Claim::WindowClosed(t) if t == ts(20))
        );
        // ...and then goes.
        assert!(matches!(
            sends::claim(&db.conn, ws, second, "d0", TTL, window, ts(20)).await?,
            Claim::Claimed(_)
        ));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    transitions_are_guarded_and_recorded,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let Created::New(send) =
            sends::create(&db.conn, ws, &new_send("asg-3", &[4, 5]), ts(0)).await?
        else {
            return Err("not new".into());
        };
        let subs = sends::submissions(&db.conn, send.id).await?;
        let Claim::Claimed(a) =
            sends::claim(&db.conn, ws, subs[0].id, "alive", TTL, None, ts(1)).await?
        else {
            return Err("claim a".into());
        };
        // Only the holder settles its claim.
        let by_other = Transition::new(SendState::Submitting, SendState::Submitted, "other", "x")
            .held_by("other");
        assert!(!sends::transition(&db.conn, a.id, &by_other, ts(2)).await?);
        let accepted = Transition {
            cio_trigger_id: Some(77),
            ..Transition::new(
                SendState::Submitting,
                SendState::Submitted,
                "alive",
                "accepted",
            )
            .held_by("alive")
        };
        assert!(sends::transition(&db.conn, a.id, &accepted, ts(2)).await?);
        // Not in the expected state any more: nothing happens.
        assert!(!sends::transition(&db.conn, a.id, &accepted, ts(3)).await?);
        let a = sends::submission(&db.conn, a.id).await?.ok_or("a")?;
        assert_eq!(
            (
                a.state,
                a.cio_trigger_id,
                a.claimed_by.as_deref(),
                a.submitted_at
            ),
            (SendState::Submitted, Some(77), None, Some(ts(2)))
        );

        // A dispatcher dies holding the second one: after its claim expires it is uncertain.
        let Claim::Claimed(b) =
            sends::claim(&db.conn, ws, subs[1].id, "dead", TTL, None, ts(4)).await?
        else {
            return Err("claim b".into());
        };
        assert!(
            sends::expire_claims(&db.conn, ws, ts(30)).await?.is_empty(),
            "not expired yet"
        );
        let expired = sends::expire_claims(&db.conn, ws, ts(4 + 61)).await?;
        assert_eq!(expired.iter().map(|s| s.id).collect::<Vec<_>>(), vec![b.id]);
        let b = sends::submission(&db.conn, b.id).await?.ok_or("b")?;
        assert_eq!(b.state, SendState::Uncertain);
        assert!(b.error.is_some());
        // Its late answer cannot overwrite that.
        let late = Transition::new(SendState::Submitting, SendState::Submitted, "dead", "late")
            .held_by("dead");
        assert!(!sends::transition(&db.conn, b.id, &late, ts(70)).await?);
        assert_eq!(
            sends::get_by_id(&db.conn, send.id)
                .await?
                .ok_or("send")?
                .state,
            SendState::Uncertain
        );

        // An operator settles it; a requeue that did not reach Customer.io gives its attempt back.
        let resolved = Transition::new(
            SendState::Uncertain,
            SendState::Pending,
            "ops@example",
            "not in Customer.io",
        );
        assert!(sends::transition(&db.conn, b.id, &resolved, ts(80)).await?);
        let Claim::Claimed(b) = sends::claim(&db.conn, ws, b.id, "d2", TTL, None, ts(80)).await?
        else {
            return Err("claim again".into());
        };
        assert_eq!(b.attempts, 2);
        let refused = Transition {
            uncount_attempt: true,
            next_attempt_at: Some(ts(90)),
            ..Transition::new(SendState::Submitting, SendState::Pending, "d2", "429").held_by("d2")
        };
        assert!(sends::transition(&db.conn, b.id, &refused, ts(81)).await?);
        let b = sends::submission(&db.conn, b.id).await?.ok_or("b")?;
        assert_eq!(
            (b.attempts, b.next_attempt_at, b.state),
            (1, ts(90), SendState::Pending)
        );
        assert_eq!(
            sends::next_due_at(&db.conn, ws, Some(send.id)).await?,
            Some(ts(90))
        );
        assert!(sends::due(&db.conn, ws, None, ts(89), 10).await?.is_empty());
        assert_eq!(sends::due(&db.conn, ws, None, ts(90), 10).await?.len(), 1);

        let history = sends::history(&db.conn, send.id).await?;
        let path: Vec<(Option<SendState>, SendState, &str)> = history
            .iter()
            .map(|h| (h.from_state, h.to_state, h.actor.as_str()))
            .collect();
        assert_eq!(
            path,
            vec![
                (None, SendState::Pending, "test"),
                (Some(SendState::Pending), SendState::Submitting, "alive"),
                (Some(SendState::Submitting), SendState::Submitted, "alive"),
                (Some(SendState::Pending), SendState::Submitting, "dead"),
                (
                    Some(SendState::Submitting),
                    SendState::Uncertain,
                    "reconciler"
                ),
                (
                    Some(SendState::Uncertain),
                    SendState::Pending,
                    "ops@example"
                ),
                (Some(SendState::Pending), SendState::Submitting, "d2"),
                (Some(SendState::Submitting), SendState::Pending, "d2"),
            ]
        );
        // Listing by state and assignment.
        let pending = sends::list(
            &db.conn,
            ws,
            &sends::ListFilter {
                state: Some(SendState::Pending),
                ..Default::default()
            },
            10,
        )
        .await?;
        assert_eq!(
            pending.iter().map(|s| s.id).collect::<Vec<_>>(),
            vec![send.id]
        );
        let none = sends::list(
            &db.conn,
            ws,
            &sends::ListFilter {
                assignment_id: Some("other".into()),
                ..Default::default()
            },
            10,
        )
        .await?;
        assert!(none.is_empty());
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    the_attempt_window_ends_at_the_claim_expiry_or_when_the_dispatcher_records_the_outcome,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let Created::New(send) =
            sends::create(&db.conn, ws, &new_send("asg-window", &[4, 5]), ts(0)).await?
        else {
            return Err("not new".into());
        };
        let subs = sends::submissions(&db.conn, send.id).await?;
        assert!(subs.iter().all(|s| s.attempt_ends_at.is_none()));

        // Claimed: the attempt may run until the claim expires.
        let Claim::Claimed(a) =
            sends::claim(&db.conn, ws, subs[0].id, "alive", TTL, None, ts(1)).await?
        else {
            return Err("claim a".into());
        };
        assert_eq!(
            (a.claim_expires_at, a.attempt_ends_at),
            (Some(ts(61)), Some(ts(61)))
        );
        // Its dispatcher records the outcome (a timeout): the window ends then, and stays ended.
        let timed_out = Transition {
            ends_attempt: true,
            ..Transition::new(
                SendState::Submitting,
                SendState::Uncertain,
                "alive",
                "timeout",
            )
            .held_by("alive")
        };
        assert!(sends::transition(&db.conn, a.id, &timed_out, ts(12)).await?);
        let a = sends::submission(&db.conn, a.id).await?.ok_or("a")?;
        assert_eq!(
            (a.claim_expires_at, a.attempt_ends_at),
            (None, Some(ts(12)))
        );

        // A dispatcher that dies holding its claim: the window ends at the claim's expiry.
        let Claim::Claimed(b) =
            sends::claim(&db.conn, ws, subs[1].id, "dead", TTL, None, ts(20)).await?
        else {
            return Err("claim b".into());
        };
        assert_eq!(sends::expire_claims(&db.conn, ws, ts(81)).await?.len(), 1);
        let b = sends::submission(&db.conn, b.id).await?.ok_or("b")?;
        assert_eq!(
            (b.state, b.claim_expires_at, b.attempt_ends_at),
            (SendState::Uncertain, None, Some(ts(80)))
        );

        // A processed trigger's errors are kept, bounded by the caller, with their count.
        let found = Transition {
            cio_trigger_id: Some(9),
            ..Transition::new(
                SendState::Uncertain,
                SendState::Submitted,
                "reconciler",
                "found",
            )
        };
        assert!(sends::transition(&db.conn, b.id, &found, ts(90)).await?);
        assert!(
            sends::submission(&db.conn, b.id)
                .await?
                .ok_or("b")?
                .trigger_errors
                .is_none()
        );
        let errors = sends::TriggerErrors {
            first: vec!["line 1: customer id \"x\" does not exist".into()],
            count: 42,
        };
        let completed = Transition {
            trigger_errors: Some(errors.clone()),
            ..Transition::new(
                SendState::Submitted,
                SendState::Completed,
                "reconciler",
                "done",
            )
        };
        assert!(sends::transition(&db.conn, b.id, &completed, ts(91)).await?);
        let b = sends::submission(&db.conn, b.id).await?.ok_or("b")?;
        assert_eq!(b.trigger_errors, Some(errors));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    one_workspace_window_spaces_the_triggers_of_every_broadcast,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let mut first = new_send("asg-ws-1", &[4]);
        first.delivery = Delivery::Broadcast { broadcast_id: 3 };
        let mut second = with_id("snd_asg-ws-2", "asg-ws-2", &[4]);
        second.delivery = Delivery::Broadcast { broadcast_id: 7 };
        let mut ids = Vec::new();
        for new in [&first, &second] {
            let (Created::New(send) | Created::Existing(send)) =
                sends::create(&db.conn, ws, new, ts(0)).await?;
            ids.push(sends::submissions(&db.conn, send.id).await?[0].id);
        }
        let window = Some(Window {
            broadcast_id: sends::WORKSPACE_WINDOW,
            spacing: SPACING,
        });
        assert!(matches!(
            sends::claim(&db.conn, ws, ids[0], "d", TTL, window, ts(1)).await?,
            Claim::Claimed(_)
        ));
        // Another broadcast, same workspace window: it waits.
        assert!(matches!(
            sends::claim(&db.conn, ws, ids[1], "d", TTL, window, ts(2)).await?,
            Claim::WindowClosed(t) if t == ts(11)
        ));
        assert!(matches!(
            sends::claim(&db.conn, ws, ids[1], "d", TTL, window, ts(11)).await?,
            Claim::Claimed(_)
        ));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    a_newsletter_send_keeps_its_subscription_topic,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let mut new = new_send("asg-topic", &[4]);
        new.delivery = Delivery::Newsletter {
            from_id: Some(2),
            subscription_topic_id: Some(5),
        };
        let Created::New(send) = sends::create(&db.conn, ws, &new, ts(0)).await? else {
            return Err("not new".into());
        };
        assert_eq!(send.delivery, new.delivery);
        let read = sends::get(&db.conn, ws, &send.public_id)
            .await?
            .ok_or("send")?;
        assert_eq!(read.delivery, new.delivery);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    the_database_clock_is_read_on_both_backends,
    |db: TestDatabase| async move {
        #[allow(clippy::disallowed_methods)] // comparing with the system clock is the point
        let before = chrono::Utc::now();
        let at = sends::database_now(&db.conn).await?;
        #[allow(clippy::disallowed_methods)]
        let after = chrono::Utc::now();
        let slack = chrono::TimeDelta::seconds(1);
        assert!(
            before - slack <= at && at <= after + slack,
            "{before} ≤ {at} ≤ {after}"
        );
        TestResult::Ok(())
    }
);
