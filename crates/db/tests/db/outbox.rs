use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sharpsend_db::outbox::{
    self, AcceptedEvent, Kind, NewAttributeUpdate, NewEvent, OutboxRow, Status, SyncStats,
};
use sharpsend_db::profiles::{self, Lookup};
use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::{DatabaseConnection, DbError};

use crate::helpers::{attrs, ts, workspace};

const MINUTE: Duration = Duration::from_secs(60);

fn update(customer_id: &str, a: serde_json::Value) -> NewAttributeUpdate {
    NewAttributeUpdate {
        customer_id: customer_id.to_owned(),
        attributes: attrs(a),
    }
}

fn event(customer_id: &str, event_id: &str, key: Option<&str>) -> NewEvent {
    NewEvent {
        customer_id: customer_id.to_owned(),
        event_id: event_id.to_owned(),
        name: "article_read".to_owned(),
        data: json!({"article": 42}),
        timestamp: Some(1_800_000_000),
        idempotency_key: key.map(str::to_owned),
    }
}

fn accepted(event_id: &str, duplicate: bool) -> AcceptedEvent {
    AcceptedEvent {
        event_id: event_id.to_owned(),
        duplicate,
    }
}

fn ids(rows: &[OutboxRow]) -> Vec<i64> {
    rows.iter().map(|r| r.id).collect()
}

/// `n` attribute updates for `n` people; returns the outbox ids, in order.
async fn queue(db: &DatabaseConnection, ws: i64, n: usize, secs: i64) -> Result<Vec<i64>, DbError> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    use sharpsend_db::entities::outbox::{Column, Entity};

    let updates: Vec<NewAttributeUpdate> = (0..n)
        .map(|i| update(&format!("p{i}"), json!({"i": i})))
        .collect();
    outbox::accept_attribute_updates(db, ws, &updates, ts(secs)).await?;
    // The newest n rows of the workspace.
    let mut ids: Vec<i64> = Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::WorkspaceId.eq(ws))
        .order_by_desc(Column::Id)
        .limit(n as u64)
        .into_tuple()
        .all(db)
        .await?;
    ids.reverse();
    Ok(ids)
}

fn join_err(e: tokio::task::JoinError) -> DbError {
    DbError::Db(sea_orm::DbErr::Custom(e.to_string()))
}

sharpsend_db::db_test!(
    accepted_updates_merge_into_the_mirror_and_queue_in_order,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let updates = vec![
            update(
                "alice",
                json!({"a": 1, "b": 2, "email": "Alice@Example.com"}),
            ),
            update("bob", json!({"x": true})),
            update("alice", json!({"b": null, "c": {"nested": [1, 2]}, "a": 3})),
        ];
        assert_eq!(
            outbox::accept_attribute_updates(c, ws, &updates, ts(0)).await?,
            3
        );

        let alice = profiles::get(c, ws, Lookup::Email("alice@example.com"))
            .await?
            .ok_or("alice missing")?;
        assert_eq!(
            alice.attributes,
            attrs(json!({"a": 3, "c": {"nested": [1, 2]}, "email": "Alice@Example.com"}))
        );
        assert_eq!(alice.email.as_deref(), Some("Alice@Example.com"));
        assert_eq!((alice.updated_at, alice.fetched_at), (ts(0), None));
        let bob = profiles::get(c, ws, Lookup::Id("bob"))
            .await?
            .ok_or("bob missing")?;
        assert_eq!(bob.attributes, attrs(json!({"x": true})));

        let rows = outbox::claim_due(c, ws, "w1", 10, MINUTE, ts(0)).await?;
        assert_eq!(rows.len(), 3);
        assert!(rows.windows(2).all(|w| w[0].id < w[1].id));
        let first = &rows[0];
        assert_eq!(
            (first.kind, first.customer_id.as_str(), &first.payload),
            (
                Kind::Identify,
                "alice",
                &json!({"a": 1, "b": 2, "email": "Alice@Example.com"})
            )
        );
        assert_eq!(rows[1].customer_id, "bob");
        // The payload is the update as accepted, nulls included.
        assert_eq!(
            rows[2].payload,
            json!({"b": null, "c": {"nested": [1, 2]}, "a": 3})
        );
        assert_eq!(
            (
                first.event_id.as_deref(),
                first.attempts,
                first.created_at,
                first.next_attempt_at
            ),
            (None, 0, ts(0), ts(60)),
            "in flight: due again when the claim expires"
        );
        assert_eq!(
            (
                first.status,
                first.claimed_by.as_deref(),
                first.claim_expires_at
            ),
            (Status::InFlight, Some("w1"), Some(ts(60)))
        );

        // A later call merges onto the stored attributes; removing email clears the column.
        let later = vec![update("alice", json!({"email": null, "d": "new"}))];
        outbox::accept_attribute_updates(c, ws, &later, ts(5)).await?;
        let alice = profiles::get(c, ws, Lookup::Id("alice"))
            .await?
            .ok_or("alice missing")?;
        assert_eq!(
            alice.attributes,
            attrs(json!({"a": 3, "c": {"nested": [1, 2]}, "d": "new"}))
        );
        assert_eq!((alice.email, alice.updated_at), (None, ts(5)));
        assert_eq!(
            profiles::get(c, ws, Lookup::Email("alice@example.com")).await?,
            None
        );
        assert_eq!(
            outbox::accept_attribute_updates(c, ws, &[], ts(5)).await?,
            0
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    a_big_batch_is_accepted_in_chunks,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        // 1,500 updates for 700 people (chunks of people and of rows).
        let updates: Vec<NewAttributeUpdate> = (0..1_500)
            .map(|i| {
                update(
                    &format!("p{:04}", i % 700),
                    json!({"last": i, format!("k{i}"): i}),
                )
            })
            .collect();
        assert_eq!(
            outbox::accept_attribute_updates(c, ws, &updates, ts(0)).await?,
            1_500
        );
        let p5 = profiles::get(c, ws, Lookup::Id("p0005"))
            .await?
            .ok_or("p0005 missing")?;
        assert_eq!(
            p5.attributes,
            attrs(json!({"last": 1405, "k5": 5, "k705": 705, "k1405": 1405}))
        );
        let stats = outbox::stats(c, ws).await?;
        assert_eq!(
            (stats.pending, stats.oldest_pending_at),
            (1_500, Some(ts(0)))
        );
        let rows = outbox::claim_due(c, ws, "w", 2_000, MINUTE, ts(0)).await?;
        assert_eq!(rows.len(), 1_500);
        let order: Vec<i64> = rows
            .iter()
            .map(|r| r.payload["last"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(
            order,
            (0..1_500).collect::<Vec<i64>>(),
            "ids follow acceptance order"
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_merges_of_one_person_lose_nothing,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let pools = [db.conn.clone(), db.connect_again().await?];
        // "old" exists before; "new" is created by whichever call comes first.
        outbox::accept_attribute_updates(&db.conn, ws, &[update("old", json!({"seed": 0}))], ts(0))
            .await?;
        let contenders = 16;
        let start = Arc::new(tokio::sync::Barrier::new(contenders));
        let mut tasks = Vec::new();
        for i in 0..contenders {
            let conn = pools[i % 2].clone();
            let start = start.clone();
            tasks.push(tokio::spawn(async move {
                let mut updates = vec![
                    update("old", json!({format!("k{i}"): i})),
                    update("new", json!({format!("k{i}"): i})),
                    update(&format!("own-{i}"), json!({"i": i})),
                ];
                if i % 2 == 1 {
                    updates.reverse(); // any order in the call: no deadlock
                }
                start.wait().await;
                outbox::accept_attribute_updates(&conn, ws, &updates, ts(1)).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.map_err(join_err)??, 3);
        }
        let mut want = attrs(json!({"seed": 0}));
        for i in 0..contenders {
            want.insert(format!("k{i}"), json!(i));
        }
        let old = profiles::get(&db.conn, ws, Lookup::Id("old"))
            .await?
            .ok_or("old missing")?;
        assert_eq!(old.attributes, want);
        want.remove("seed");
        let new = profiles::get(&db.conn, ws, Lookup::Id("new"))
            .await?
            .ok_or("new missing")?;
        assert_eq!(new.attributes, want);
        assert_eq!(outbox::stats(&db.conn, ws).await?.pending, 1 + 3 * 16);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    acceptance_is_all_or_nothing,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        outbox::accept_attribute_updates(c, ws, &[update("kept", json!({"v": 1}))], ts(0)).await?;

        // A customer_id over 150 bytes in the middle of the batch.
        let mut updates: Vec<NewAttributeUpdate> = (0..800)
            .map(|i| update(&format!("p{i}"), json!({"v": i})))
            .collect();
        updates.push(update("kept", json!({"v": 2})));
        updates.insert(400, update(&"x".repeat(151), json!({"v": 0})));
        let err = outbox::accept_attribute_updates(c, ws, &updates, ts(1))
            .await
            .err()
            .ok_or("an over-long customer_id must fail")?;
        assert!(matches!(err, DbError::Db(_)), "{err:?}");
        assert_eq!(err.to_string(), "database error", "no database text");
        assert_eq!(profiles::get(c, ws, Lookup::Id("p0")).await?, None);
        let kept = profiles::get(c, ws, Lookup::Id("kept"))
            .await?
            .ok_or("kept missing")?;
        assert_eq!(kept.attributes, attrs(json!({"v": 1})));
        assert_eq!(outbox::stats(c, ws).await?.pending, 1);

        // An event id used twice (a unique column) fails the whole call, profiles included.
        let events = vec![
            event("new-person", "01EVENT0000000000000000001", Some("k1")),
            event("other", "01EVENT0000000000000000002", None),
            event("other", "01EVENT0000000000000000001", None),
        ];
        assert!(outbox::accept_events(c, ws, &events, ts(2)).await.is_err());
        assert_eq!(profiles::get(c, ws, Lookup::Id("new-person")).await?, None);
        assert_eq!(outbox::stats(c, ws).await?.pending, 1);
        // The key was not taken by the failed call.
        let ok = outbox::accept_events(c, ws, &events[..2], ts(3)).await?;
        assert_eq!(
            ok,
            [
                accepted("01EVENT0000000000000000001", false),
                accepted("01EVENT0000000000000000002", false)
            ]
        );

        // An unknown workspace is refused (foreign key), also for events.
        assert!(
            outbox::accept_attribute_updates(c, 9_999, &[update("a", json!({}))], ts(4))
                .await
                .is_err()
        );
        assert!(
            outbox::accept_events(c, 9_999, &events[1..2], ts(4))
                .await
                .is_err()
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    events_are_queued_once_per_idempotency_key,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let ws2 = workspace(&db, "site-2").await?;

        let first = vec![
            event("alice", "E1", Some("k1")),
            NewEvent {
                timestamp: None,
                data: json!(null),
                ..event("bob", "E2", None)
            },
            event("alice", "E3", Some("k1")),
            event("carol", "E4", Some("k2")),
        ];
        assert_eq!(
            outbox::accept_events(c, ws, &first, ts(100)).await?,
            [
                accepted("E1", false),
                accepted("E2", false),
                accepted("E1", true),
                accepted("E4", false)
            ]
        );
        // Profiles are created, with no attributes.
        let bob = profiles::get(c, ws, Lookup::Id("bob"))
            .await?
            .ok_or("bob missing")?;
        assert!(bob.attributes.is_empty());

        // Across calls: a new event id with a known key, and a retry of the same event.
        let second = vec![
            event("alice", "E5", Some("k1")),
            event("carol", "E4", Some("k2")),
            event("dave", "E6", Some("k3")),
            event("dave", "E7", None),
        ];
        assert_eq!(
            outbox::accept_events(c, ws, &second, ts(200)).await?,
            [
                accepted("E1", true),
                accepted("E4", true),
                accepted("E6", false),
                accepted("E7", false)
            ]
        );
        // Keys are per workspace.
        assert_eq!(
            outbox::accept_events(c, ws2, &second[..1], ts(200)).await?,
            [accepted("E5", false)]
        );

        let rows = outbox::claim_due(c, ws, "w", 100, MINUTE, ts(300)).await?;
        let events: Vec<(&str, &str)> = rows
            .iter()
            .map(|r| (r.event_id.as_deref().unwrap_or("-"), r.customer_id.as_str()))
            .collect();
        assert_eq!(
            events,
            [
                ("E1", "alice"),
                ("E2", "bob"),
                ("E4", "carol"),
                ("E6", "dave"),
                ("E7", "dave")
            ]
        );
        assert!(rows.iter().all(|r| r.kind == Kind::Event));
        assert_eq!(
            rows[0].payload,
            json!({"name": "article_read", "data": {"article": 42}, "timestamp": 1_800_000_000})
        );
        assert_eq!(rows[0].idempotency_key.as_deref(), Some("k1"));
        // No timestamp: the acceptance time.
        assert_eq!(
            rows[1].payload,
            json!({"name": "article_read", "data": null, "timestamp": ts(100).timestamp()})
        );
        assert_eq!(outbox::accept_events(c, ws, &[], ts(0)).await?, []);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_calls_with_one_key_queue_one_event,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let pools = [db.conn.clone(), db.connect_again().await?];
        for round in 0..3 {
            let contenders = 12;
            let start = Arc::new(tokio::sync::Barrier::new(contenders));
            let mut tasks = Vec::new();
            for i in 0..contenders {
                let conn = pools[i % 2].clone();
                let start = start.clone();
                tasks.push(tokio::spawn(async move {
                    let key = format!("key-{round}");
                    let events = vec![
                        event(
                            &format!("person-{i}"),
                            &format!("R{round}-E{i}"),
                            Some(&key),
                        ),
                        event(
                            "shared",
                            &format!("R{round}-X{i}"),
                            Some(&format!("own-{round}-{i}")),
                        ),
                    ];
                    start.wait().await;
                    outbox::accept_events(&conn, ws, &events, ts(round)).await
                }));
            }
            let mut results = Vec::new();
            for t in tasks {
                results.push(t.await.map_err(join_err)??);
            }
            let winners: HashSet<&str> = results.iter().map(|r| r[0].event_id.as_str()).collect();
            assert_eq!(winners.len(), 1, "one event id for the key: {winners:?}");
            let fresh = results.iter().filter(|r| !r[0].duplicate).count();
            assert_eq!(fresh, 1, "exactly one caller queued it");
            assert!(results.iter().all(|r| !r[1].duplicate));
        }
        let stats = outbox::stats(&db.conn, ws).await?;
        assert_eq!(stats.pending, 3 + 3 * 12);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    claims_take_due_rows_in_order_up_to_the_limit,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let ws2 = workspace(&db, "site-2").await?;
        let early = queue(c, ws, 5, 0).await?;
        let late = queue(c, ws, 2, 100).await?;
        queue(c, ws2, 3, 0).await?;

        assert!(
            outbox::claim_due(c, ws, "w", 10, MINUTE, ts(-1))
                .await?
                .is_empty()
        );
        let a = outbox::claim_due(c, ws, "w", 2, MINUTE, ts(50)).await?;
        assert_eq!(ids(&a), early[..2]);
        let b = outbox::claim_due(c, ws, "w", 10, MINUTE, ts(50)).await?;
        assert_eq!(ids(&b), early[2..], "not yet due rows are left");
        assert!(
            outbox::claim_due(c, ws, "w", 10, MINUTE, ts(99))
                .await?
                .is_empty()
        );
        // The late rows are p0's and p1's second: they wait for the first to be settled.
        assert_eq!(outbox::next_due_at(c, ws).await?, Some(ts(110)));
        outbox::mark_delivered(c, "w", &early[..3], ts(60)).await?;
        assert_eq!(outbox::next_due_at(c, ws).await?, Some(ts(100)));

        // A retried row is due again at its next_attempt_at, before younger rows by id.
        assert_eq!(
            outbox::mark_retry(c, "w", &[early[3]], "503 from Customer.io", ts(100), ts(51))
                .await?,
            1
        );
        let again = outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(100)).await?;
        assert_eq!(ids(&again), [early[3], late[0], late[1]]);
        let retried = &again[0];
        assert_eq!(
            (
                retried.attempts,
                retried.last_error.as_deref(),
                retried.last_attempt_at
            ),
            (1, Some("503 from Customer.io"), Some(ts(51)))
        );
        assert_eq!(
            outbox::claim_due(c, ws2, "w", 10, MINUTE, ts(100))
                .await?
                .len(),
            3
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    expired_claims_are_reclaimed_and_only_the_holder_settles,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let all = queue(c, ws, 4, 0).await?;

        let w1 = outbox::claim_due(c, ws, "w1", 10, MINUTE, ts(0)).await?;
        assert_eq!(ids(&w1), all);
        // Claimed rows are not due before the claim expires...
        assert!(
            outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(59))
                .await?
                .is_empty()
        );
        assert_eq!(outbox::next_due_at(c, ws).await?, Some(ts(60)));
        // ...w1 settles one in time...
        assert_eq!(outbox::mark_delivered(c, "w1", &all[..1], ts(30)).await?, 1);
        // ...and the rest are w2's once w1's claim has lapsed.
        let w2 = outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(60)).await?;
        assert_eq!(ids(&w2), all[1..]);
        assert!(w2.iter().all(|r| r.claimed_by.as_deref() == Some("w2")));

        // w1 (late) can no longer settle them; w2 can, once.
        assert_eq!(outbox::mark_delivered(c, "w1", &all, ts(61)).await?, 0);
        assert_eq!(
            outbox::mark_retry(c, "w1", &all, "late", ts(70), ts(61)).await?,
            0
        );
        assert_eq!(
            outbox::mark_dead(c, "w1", &[(all[1], "late".into())], ts(61)).await?,
            0
        );
        assert_eq!(
            outbox::mark_delivered(c, "w2", &all[1..2], ts(62)).await?,
            1
        );
        assert_eq!(
            outbox::mark_dead(
                c,
                "w2",
                &[
                    (all[1], "again".into()),
                    (all[2], "bad attribute".into()),
                    (all[3], "too big".into())
                ],
                ts(63)
            )
            .await?,
            2,
            "the delivered one is no longer held"
        );
        let rows = outbox::get_many(c, ws, &all).await?;
        let states: Vec<(Status, i32, Option<&str>)> = rows
            .iter()
            .map(|r| (r.status, r.attempts, r.last_error.as_deref()))
            .collect();
        assert_eq!(
            states,
            [
                (Status::Delivered, 1, None),
                (Status::Delivered, 1, None),
                (Status::Dead, 1, Some("bad attribute")),
                (Status::Dead, 1, Some("too big")),
            ]
        );
        assert_eq!(rows[1].delivered_at, Some(ts(62)));
        assert_eq!(rows[1].claim_expires_at, None);
        assert_eq!(outbox::next_due_at(c, ws).await?, None);
        assert!(
            outbox::claim_due(c, ws, "w3", 10, MINUTE, ts(10_000))
                .await?
                .is_empty()
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_claimers_never_share_a_row,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let all = queue(&db.conn, ws, 2_000, 0).await?;
        let mut pools = vec![db.conn.clone()];
        for _ in 0..3 {
            pools.push(db.connect_again().await?);
        }
        // Every worker claims once, all at the same moment, and none goes on before all have:
        // so the claimers overlap whatever the scheduler does (on SQLite one of them could
        // otherwise take every batch before the others start).
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let first_claims_done = Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for w in 0..8 {
            let conn = pools[w % 4].clone();
            let (start, first_claims_done) = (start.clone(), first_claims_done.clone());
            tasks.push(tokio::spawn(async move {
                let worker = format!("worker-{w}");
                let mut mine = Vec::new();
                start.wait().await;
                let mut first = true;
                loop {
                    let rows = outbox::claim_due(&conn, ws, &worker, 50, MINUTE, ts(1)).await;
                    if first {
                        // Reached even by a failed claim: the others must not wait forever.
                        first = false;
                        first_claims_done.wait().await;
                    }
                    let rows = rows?;
                    if rows.is_empty() {
                        break;
                    }
                    assert!(rows.len() <= 50);
                    assert!(
                        rows.iter()
                            .all(|r| r.claimed_by.as_deref() == Some(worker.as_str()))
                    );
                    mine.extend(ids(&rows));
                }
                Ok::<_, DbError>(mine)
            }));
        }
        let mut claimed = Vec::new();
        for t in tasks {
            let mine = t.await.map_err(join_err)??;
            assert!(
                mine.len() >= 50,
                "each worker's first claim took a full batch"
            );
            claimed.extend(mine);
        }
        assert_eq!(claimed.len(), 2_000, "every row claimed exactly once");
        claimed.sort_unstable();
        assert_eq!(claimed, all);
        let stats = outbox::stats(&db.conn, ws).await?;
        assert_eq!((stats.pending, stats.in_flight), (0, 2_000));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    stats_failures_dead_letters_requeue_and_purge,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        assert_eq!(outbox::stats(c, ws).await?, SyncStats::default());
        assert_eq!(outbox::next_due_at(c, ws).await?, None);

        let r = queue(c, ws, 6, 0).await?;
        let newer = queue(c, ws, 1, 10).await?;
        outbox::claim_due(c, ws, "w", 6, MINUTE, ts(20)).await?;
        outbox::mark_delivered(c, "w", &r[0..2], ts(21)).await?;
        outbox::mark_delivered(c, "w", &r[2..3], ts(25)).await?;
        outbox::mark_retry(c, "w", &r[3..4], "timeout", ts(100), ts(22)).await?;
        outbox::mark_retry(c, "w", &r[4..5], "HTTP 500", ts(90), ts(23)).await?;
        outbox::mark_dead(c, "w", &[(r[5], "HTTP 400: invalid".into())], ts(24)).await?;

        assert_eq!(
            outbox::stats(c, ws).await?,
            SyncStats {
                pending: 3,
                in_flight: 0,
                delivered: 3,
                dead: 1,
                oldest_pending_at: Some(ts(0)),
                last_delivered_at: Some(ts(25)),
            }
        );
        assert_eq!(
            outbox::next_due_at(c, ws).await?,
            Some(ts(10)),
            "the newer row"
        );
        assert_eq!(
            ids(&outbox::recent_failures(c, ws, 10).await?),
            [r[4], r[3]]
        );
        assert_eq!(ids(&outbox::recent_failures(c, ws, 1).await?), [r[4]]);
        let dead = outbox::dead_letters(c, ws, 10).await?;
        assert_eq!(ids(&dead), [r[5]]);
        assert_eq!(
            (
                dead[0].status,
                dead[0].attempts,
                dead[0].last_error.as_deref(),
                dead[0].claimed_by.as_deref()
            ),
            (Status::Dead, 1, Some("HTTP 400: invalid"), Some("w"))
        );

        // The newer row is in flight: the oldest undelivered is still r[3].
        outbox::claim_due(c, ws, "w", 1, MINUTE, ts(30)).await?;
        let s = outbox::stats(c, ws).await?;
        assert_eq!(
            (s.pending, s.in_flight, s.oldest_pending_at),
            (2, 1, Some(ts(0)))
        );
        outbox::mark_delivered(c, "w", &newer, ts(31)).await?;
        assert_eq!(outbox::next_due_at(c, ws).await?, Some(ts(90)));

        // Requeue: by id (others ignored), then all.
        assert_eq!(
            outbox::requeue_dead(c, ws, Some(&[r[0], r[5]]), ts(40)).await?,
            1
        );
        let back = outbox::get_many(c, ws, &[r[5]]).await?;
        assert_eq!(
            (
                back[0].status,
                back[0].attempts,
                back[0].next_attempt_at,
                back[0].last_error.as_deref()
            ),
            (Status::Pending, 0, ts(40), None)
        );
        assert!(outbox::dead_letters(c, ws, 10).await?.is_empty());
        assert_eq!(outbox::requeue_dead(c, ws, None, ts(40)).await?, 0);
        assert_eq!(outbox::requeue_dead(c, ws, Some(&[]), ts(40)).await?, 0);
        let again = outbox::claim_due(c, ws, "w", 10, MINUTE, ts(40)).await?;
        assert_eq!(ids(&again), [r[5]]);
        outbox::mark_dead(c, "w", &[(r[5], "still invalid".into())], ts(41)).await?;
        outbox::mark_dead(c, "w", &[], ts(41)).await?;
        assert_eq!(outbox::requeue_dead(c, ws, None, ts(42)).await?, 1);

        // Purge delivered rows older than a cut-off; nothing else.
        assert_eq!(outbox::purge_delivered(c, ws, ts(25)).await?, 2);
        let left = outbox::stats(c, ws).await?;
        assert_eq!(
            (left.pending, left.delivered, left.last_delivered_at),
            (3, 2, Some(ts(31)))
        );
        assert_eq!(outbox::purge_delivered(c, ws, ts(1_000)).await?, 2);
        assert_eq!(outbox::get_many(c, ws, &r).await?.len(), 3);
        TestResult::Ok(())
    }
);

#[test]
fn kinds_and_statuses_round_trip_through_text() {
    for k in [Kind::Identify, Kind::Event] {
        assert_eq!(k.as_str().parse::<Kind>(), Ok(k));
        assert_eq!(k.to_string(), k.as_str());
    }
    for s in [
        Status::Pending,
        Status::InFlight,
        Status::Delivered,
        Status::Dead,
    ] {
        assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        assert_eq!(s.to_string(), s.as_str());
    }
    assert_eq!(Status::InFlight.as_str(), "in_flight");
    assert!("sent".parse::<Status>().is_err());
    assert!("track".parse::<Kind>().is_err());
}

/// Queues one attribute update and returns its outbox id.
async fn queue_one(
    db: &DatabaseConnection,
    ws: i64,
    customer_id: &str,
    a: serde_json::Value,
    secs: i64,
) -> Result<i64, DbError> {
    outbox::accept_attribute_updates(db, ws, &[update(customer_id, a)], ts(secs)).await?;
    last_id(db, ws).await
}

/// The newest outbox id of the workspace.
async fn last_id(db: &DatabaseConnection, ws: i64) -> Result<i64, DbError> {
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
    use sharpsend_db::entities::outbox::{Column, Entity};
    let id: Option<i64> = Entity::find()
        .select_only()
        .column(Column::Id)
        .filter(Column::WorkspaceId.eq(ws))
        .order_by_desc(Column::Id)
        .into_tuple()
        .one(db)
        .await?;
    Ok(id.unwrap_or(0))
}

sharpsend_db::db_test!(
    a_persons_later_row_is_not_claimed_while_an_earlier_one_is_pending_or_in_flight,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let u1 = queue_one(c, ws, "p", json!({"plan": "free", "seats": 1}), 0).await?;
        let x = queue_one(c, ws, "q", json!({"plan": "free"}), 0).await?;
        let u2 = queue_one(c, ws, "p", json!({"plan": "pro"}), 1).await?;

        // w1 holds p's first row: p's second is nobody's while it is in flight.
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w1", 1, MINUTE, ts(2)).await?),
            [u1]
        );
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(2)).await?),
            [x],
            "another worker must not take p's later row while the earlier one is in flight"
        );
        assert_eq!(outbox::next_due_at(c, ws).await?, Some(ts(62)));
        outbox::mark_delivered(c, "w2", &[x], ts(3)).await?;
        // U1 failed and waits for its backoff: U2 still waits behind it.
        assert_eq!(
            outbox::mark_retry(c, "w1", &[u1], "HTTP 503", ts(100), ts(3)).await?,
            1
        );
        assert!(
            outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(50))
                .await?
                .is_empty(),
            "p's later row overtook a retry"
        );
        assert_eq!(outbox::next_due_at(c, ws).await?, Some(ts(100)));
        // When U1 is due, both go together, in order.
        let both = outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(100)).await?;
        assert_eq!(ids(&both), [u1, u2]);
        // Their claim lapses (w2 died): whoever claims next takes both, still in order.
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w3", 10, MINUTE, ts(160)).await?),
            [u1, u2]
        );
        // A claim that cuts p's rows takes a prefix, never a later row alone.
        outbox::release(c, "w3", &[u1, u2], ts(161)).await?;
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w4", 1, MINUTE, ts(161)).await?),
            [u1]
        );
        assert!(
            outbox::claim_due(c, ws, "w5", 10, MINUTE, ts(161))
                .await?
                .is_empty()
        );
        // A dead row does not hold the person back.
        outbox::mark_dead(c, "w4", &[(u1, "rejected".into())], ts(162)).await?;
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w5", 10, MINUTE, ts(162)).await?),
            [u2]
        );
        // A dead letter re-queued while a later row is in flight waits for it.
        assert_eq!(outbox::requeue_dead(c, ws, None, ts(163)).await?, 1);
        assert!(
            outbox::claim_due(c, ws, "w6", 10, MINUTE, ts(163))
                .await?
                .is_empty()
        );
        outbox::mark_delivered(c, "w5", &[u2], ts(164)).await?;
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w6", 10, MINUTE, ts(164)).await?),
            [u1]
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    released_rows_keep_their_attempts_and_renewed_claims_hold,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let all = queue(c, ws, 3, 0).await?;
        outbox::claim_due(c, ws, "w1", 10, MINUTE, ts(0)).await?;
        // Renewed before it lapses: still w1's at ts(60).
        assert_eq!(outbox::extend_claim(c, "w1", &all[..2], ts(100)).await?, 2);
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(60)).await?),
            all[2..]
        );
        // Only the holder can renew or release.
        assert_eq!(outbox::extend_claim(c, "w2", &all[..2], ts(200)).await?, 0);
        assert_eq!(outbox::release(c, "w2", &all[..2], ts(61)).await?, 0);
        assert_eq!(outbox::release(c, "w1", &all[..2], ts(61)).await?, 2);
        let rows = outbox::get_many(c, ws, &all[..2]).await?;
        assert!(rows.iter().all(|r| r.status == Status::Pending
            && r.attempts == 0
            && r.next_attempt_at == ts(61)
            && r.claimed_by.is_none()));
        assert_eq!(
            ids(&outbox::claim_due(c, ws, "w2", 10, MINUTE, ts(61)).await?),
            all[..2]
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_claimers_take_whole_prefixes_of_each_persons_rows,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        // 200 people, 10 rows each, interleaved.
        let updates: Vec<NewAttributeUpdate> = (0..2_000)
            .map(|i| update(&format!("p{}", i % 200), json!({"n": i / 200})))
            .collect();
        outbox::accept_attribute_updates(&db.conn, ws, &updates, ts(0)).await?;
        let mut pools = vec![db.conn.clone()];
        for _ in 0..3 {
            pools.push(db.connect_again().await?);
        }
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for w in 0..8 {
            let conn = pools[w % 4].clone();
            let start = start.clone();
            tasks.push(tokio::spawn(async move {
                let worker = format!("worker-{w}");
                let mut mine = Vec::new();
                start.wait().await;
                loop {
                    let rows = outbox::claim_due(&conn, ws, &worker, 37, MINUTE, ts(1)).await?;
                    if rows.is_empty() {
                        break;
                    }
                    mine.extend(
                        rows.into_iter()
                            .map(|r| (r.customer_id, r.payload["n"].as_i64().unwrap_or(-1))),
                    );
                }
                Ok::<_, DbError>((worker, mine))
            }));
        }
        let mut holder: std::collections::HashMap<String, (String, Vec<i64>)> =
            std::collections::HashMap::new();
        for t in tasks {
            let (worker, mine) = t.await.map_err(join_err)??;
            for (person, n) in mine {
                let entry = holder
                    .entry(person.clone())
                    .or_insert((worker.clone(), Vec::new()));
                assert_eq!(
                    entry.0, worker,
                    "{person}'s rows were claimed by two workers"
                );
                entry.1.push(n);
            }
        }
        assert_eq!(holder.len(), 200);
        for (person, (_, mut ns)) in holder {
            ns.sort_unstable();
            let prefix: Vec<i64> = (0..ns.len() as i64).collect();
            assert_eq!(ns, prefix, "{person}: claimed rows are not a prefix");
        }
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    requeued_dead_letters_leave_out_what_later_updates_set,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let u1 = queue_one(c, ws, "p", json!({"plan": "free", "score": 1}), 0).await?;
        let u2 = queue_one(c, ws, "p", json!({"color": "red"}), 0).await?;
        outbox::accept_events(
            c,
            ws,
            &[event("p", "01EVENT0000000000000000001", None)],
            ts(0),
        )
        .await?;
        let e1 = last_id(c, ws).await?;
        let q1 = queue_one(c, ws, "q", json!({"plan": "free"}), 0).await?;
        // An outage: all four given up on.
        outbox::claim_due(c, ws, "w", 10, MINUTE, ts(1)).await?;
        let dead: Vec<(i64, String)> = [u1, u2, e1, q1]
            .iter()
            .map(|id| (*id, "gave up after 10 attempts".to_owned()))
            .collect();
        assert_eq!(outbox::mark_dead(c, "w", &dead, ts(2)).await?, 4);
        // Back up: newer values for p were delivered (plan) or are on their way (color).
        let u3 = queue_one(c, ws, "p", json!({"plan": "pro"}), 3).await?;
        outbox::claim_due(c, ws, "w", 10, MINUTE, ts(3)).await?;
        outbox::mark_delivered(c, "w", &[u3], ts(4)).await?;
        let u4 = queue_one(c, ws, "p", json!({"color": "blue", "size": null}), 5).await?;

        // Re-queued: what is still p's newest (score) goes; red is settled, not sent.
        assert_eq!(outbox::requeue_dead(c, ws, None, ts(6)).await?, 3);
        let rows = outbox::get_many(c, ws, &[u1, u2, e1, q1, u4]).await?;
        let state: Vec<(i64, Status, &serde_json::Value)> =
            rows.iter().map(|r| (r.id, r.status, &r.payload)).collect();
        assert_eq!(
            state,
            [
                (u1, Status::Pending, &json!({"score": 1})),
                (u2, Status::Delivered, &json!({"color": "red"})),
                (e1, Status::Pending, &rows[2].payload),
                (q1, Status::Pending, &json!({"plan": "free"})),
                (u4, Status::Pending, &json!({"color": "blue", "size": null})),
            ]
        );
        assert_eq!(rows[1].delivered_at, Some(ts(6)));
        assert!(
            rows[1]
                .last_error
                .as_deref()
                .is_some_and(|e| e.contains("superseded")),
            "{:?}",
            rows[1].last_error
        );
        assert_eq!(rows[2].payload["name"], json!("article_read"));
        assert_eq!(outbox::stats(c, ws).await?.dead, 0);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    one_workspaces_transitions_never_wait_for_anothers,
    |db: TestDatabase| async move {
        use sea_orm::{DbBackend, TransactionTrait};

        let a = workspace(&db, "site-a").await?;
        let b = workspace(&db, "site-b").await?;
        let a_rows = queue(&db.conn, a, 3, 10).await?;
        let b_rows = queue(&db.conn, b, 3, 10).await?;
        if db.conn.get_database_backend() != DbBackend::Postgres {
            // SQLite runs one writer at a time for the whole file: nothing per workspace to show.
            return TestResult::Ok(());
        }
        // Another process holds A's transition lock (as a claim over a huge backlog of A's
        // would, for as long as its statement runs).
        let other = db.connect_again().await?;
        let holder = other.begin().await?;
        outbox::lock_transitions(&holder, a).await?;

        // B's claim, retry, release and renewal go on meanwhile.
        let within = Duration::from_secs(10);
        let claimed = tokio::time::timeout(
            within,
            outbox::claim_due(&db.conn, b, "wb", 10, MINUTE, ts(20)),
        )
        .await
        .map_err(|_| "B's claim waited for A's lock")??;
        assert_eq!(ids(&claimed), b_rows);
        let renewed = tokio::time::timeout(
            within,
            outbox::extend_claim(&db.conn, "wb", &b_rows, ts(100)),
        )
        .await
        .map_err(|_| "B's renewal waited for A's lock")??;
        assert_eq!(renewed, 3);
        let retried = tokio::time::timeout(
            within,
            outbox::mark_retry(&db.conn, "wb", &b_rows[..1], "HTTP 503", ts(30), ts(21)),
        )
        .await
        .map_err(|_| "B's retry waited for A's lock")??;
        assert_eq!(retried, 1);
        let released = tokio::time::timeout(
            within,
            outbox::release(&db.conn, "wb", &b_rows[1..], ts(21)),
        )
        .await
        .map_err(|_| "B's release waited for A's lock")??;
        assert_eq!(released, 2);

        // A's own claim still waits for A's lock: the exclusion within a workspace holds.
        let conn = db.conn.clone();
        let a_claim =
            tokio::spawn(
                async move { outbox::claim_due(&conn, a, "wa", 10, MINUTE, ts(20)).await },
            );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !a_claim.is_finished(),
            "A's claim did not wait for A's lock"
        );
        holder.rollback().await?;
        let claimed = tokio::time::timeout(within, a_claim)
            .await
            .map_err(|_| "A's claim never ran")?
            .map_err(join_err)??;
        assert_eq!(ids(&claimed), a_rows);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    merges_remove_set_and_keep_attributes_of_new_and_existing_people_alike,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        // An imported person whose stored attributes hold a null and a nested null.
        profiles::upsert_fetched(
            c,
            ws,
            &[profiles::FetchedProfile {
                customer_id: "known".to_owned(),
                email: Some("Known@Example.com".to_owned()),
                cio_id: None,
                attributes: attrs(json!({"kept": null, "n": {"x": null}, "gone": 1, "email": "Known@Example.com"})),
                cio_segments: None,
            }],
            ts(0),
        )
        .await?;
        let updates = vec![
            update("fresh", json!({"a": 1, "gone": null})),
            update("known", json!({"gone": null, "a": 1})),
            update("fresh", json!({"a": null, "b": {"y": null}, "email": 7})),
            update("known", json!({"a": 2, "email": "NEW@example.com"})),
            update("other", json!({"c": null})),
        ];
        assert_eq!(
            outbox::accept_attribute_updates(c, ws, &updates, ts(1)).await?,
            5
        );
        let fresh = profiles::get(c, ws, Lookup::Id("fresh"))
            .await?
            .ok_or("fresh missing")?;
        // Removals of attributes a new person never had leave nothing; nested nulls stay.
        assert_eq!(
            fresh.attributes,
            attrs(json!({"b": {"y": null}, "email": 7}))
        );
        assert_eq!(fresh.email, None, "a non-string email clears the column");
        let other = profiles::get(c, ws, Lookup::Id("other"))
            .await?
            .ok_or("other missing")?;
        assert_eq!(other.attributes, attrs(json!({})));
        let known = profiles::get(c, ws, Lookup::Email("new@example.com"))
            .await?
            .ok_or("known not found by its new email")?;
        assert_eq!(
            known.attributes,
            attrs(json!({"kept": null, "n": {"x": null}, "a": 2, "email": "NEW@example.com"})),
            "attributes the call does not touch are kept as stored, nulls included"
        );
        assert_eq!(
            (
                known.customer_id.as_str(),
                known.updated_at,
                known.fetched_at
            ),
            ("known", ts(1), Some(ts(0)))
        );
        // A later call without email leaves the column alone.
        outbox::accept_attribute_updates(c, ws, &[update("known", json!({"a": 3}))], ts(2)).await?;
        let known = profiles::get(c, ws, Lookup::Id("known"))
            .await?
            .ok_or("known missing")?;
        assert_eq!(known.email.as_deref(), Some("NEW@example.com"));
        assert_eq!(known.attributes["a"], json!(3));
        TestResult::Ok(())
    }
);

/// PostgreSQL: the two ingest statements (attribute merge, events) are planned once per
/// connection and the plan kept, and only they: the rest of the caller's transaction is planned
/// per execution again (a generic plan made while a table is small keeps scanning it once it is
/// large).
#[tokio::test(flavor = "multi_thread")]
async fn ingest_statements_alone_keep_their_plans_on_postgres() {
    use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement, TransactionTrait};
    use sharpsend_db::testing::{Backend, run};

    async fn text(txn: &DatabaseTransaction, sql: &str) -> Result<String, DbError> {
        let row = txn
            .query_one_raw(Statement::from_string(sea_orm::DbBackend::Postgres, sql))
            .await?
            .ok_or_else(|| sea_orm::DbErr::RecordNotFound(sql.into()))?;
        Ok(row.try_get_by_index::<String>(0)?)
    }
    // `generic/custom` plans of this connection's prepared statements starting with `prefix`.
    async fn plans(txn: &DatabaseTransaction, prefix: &str) -> Result<String, DbError> {
        text(
            txn,
            &format!(
                "SELECT COALESCE(SUM(generic_plans), 0) || '/' || COALESCE(SUM(custom_plans), 0) \
                 FROM pg_prepared_statements WHERE statement LIKE '{prefix}%'"
            ),
        )
        .await
    }

    run(Backend::Postgres, true, |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let txn = db.conn.begin().await?;
        assert_eq!(
            text(&txn, "SHOW plan_cache_mode").await?,
            "force_custom_plan"
        );
        for i in 0..3 {
            outbox::accept_attribute_updates(&txn, ws, &[update("ann", json!({"n": i}))], ts(1))
                .await?;
            outbox::accept_events(
                &txn,
                ws,
                &[event("bob", &format!("01JE00000000000000000000E{i}"), None)],
                ts(1),
            )
            .await?;
        }
        assert_eq!(plans(&txn, "WITH merged").await?, "3/0");
        assert_eq!(plans(&txn, "WITH created").await?, "3/0");
        assert_eq!(
            text(&txn, "SHOW plan_cache_mode").await?,
            "force_custom_plan"
        );
        txn.commit().await?;
        TestResult::Ok(())
    })
    .await;
}
