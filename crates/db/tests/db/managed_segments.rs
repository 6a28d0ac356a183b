//! Managed segments: evaluation records the membership and queues the difference in the outbox
//! in one transaction, in rows of at most 1000 ids; manual membership; delivery support.

use std::collections::BTreeSet;

use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::json;
use sharpsend_db::criteria_sql::{Comparison, Filter};
use sharpsend_db::managed_segments::{
    self, Applied, ManualChange, NewManagedSegment, Scope, SegmentUpdate, StoredCriteria,
};
use sharpsend_db::outbox::{self, Kind, NewAttributeUpdate, OutboxRow, Status};
use sharpsend_db::profiles::{self, FetchedProfile};
use sharpsend_db::segments;
use sharpsend_db::testing::{TestDatabase, TestResult};

use crate::helpers::{attrs, ts, workspace};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

fn person(i: usize, score: i64) -> FetchedProfile {
    FetchedProfile {
        customer_id: format!("p{i:05}"),
        email: None,
        cio_id: None,
        // Imported from Customer.io: strings.
        attributes: attrs(json!({ "score": score.to_string() })),
        cio_segments: None,
    }
}

fn criteria(attribute: &str) -> StoredCriteria {
    StoredCriteria {
        criteria: json!({"attribute": {"field": attribute, "operator": "gte", "value": 50}}),
        referenced_attributes: vec![attribute.to_owned()],
        referenced_segments: vec![],
    }
}

fn score_at_least(n: f64) -> Filter {
    Filter::Number {
        attribute: "score".into(),
        op: Comparison::Gte,
        value: n,
    }
}

/// Every outbox row of the workspace (ids 1..=n).
async fn outbox_rows(db: &TestDatabase, ws: i64) -> Res<Vec<OutboxRow>> {
    let ids: Vec<i64> = (1..=100_000).collect();
    Ok(outbox::get_many(&db.conn, ws, &ids).await?)
}

/// The ids carried by segment rows of `kind` among `rows`, checking each row's shape.
fn carried(rows: &[OutboxRow], kind: Kind, segment: i64) -> Res<BTreeSet<String>> {
    let mut all = BTreeSet::new();
    for row in rows.iter().filter(|r| r.kind == kind) {
        assert_eq!(row.customer_id, format!("segment:{segment}"));
        assert_eq!(row.status, Status::Pending);
        assert_eq!(row.payload["segment_id"], json!(segment));
        let ids: Vec<String> = serde_json::from_value(row.payload["ids"].clone())?;
        assert!(
            !ids.is_empty() && ids.len() <= 1000,
            "{} ids in one row",
            ids.len()
        );
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ids of a row are sorted");
        for id in ids {
            assert!(all.insert(id), "an id queued twice");
        }
    }
    Ok(all)
}

async fn members(db: &TestDatabase, ws: i64, segment: i64) -> Res<BTreeSet<String>> {
    Ok(
        managed_segments::members_page(&db.conn, ws, segment, None, 1_000_000)
            .await?
            .into_iter()
            .collect(),
    )
}

sharpsend_db::db_test!(
    evaluation_records_membership_and_queues_the_difference_in_rows_of_1000_ids,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let people: Vec<FetchedProfile> = (0..2600).map(|i| person(i, (i % 100) as i64)).collect();
        profiles::upsert_fetched(&db.conn, ws, &people, ts(0)).await?;
        let created = managed_segments::create(
            &db.conn,
            ws,
            &NewManagedSegment {
                cio_segment_id: 77,
                name: "High scorers".into(),
                description: None,
                criteria: Some(criteria("score")),
                completes: None,
            },
            ts(1),
        )
        .await?;
        assert!(created.evaluation_due && created.member_count == 0 && created.revision == 0);
        let mirror = segments::get(&db.conn, ws, 77).await?.ok_or("mirror row")?;
        assert_eq!(
            (mirror.segment_type.as_str(), mirror.member_count),
            ("manual", Some(0))
        );

        let expected: BTreeSet<String> = (0..2600)
            .filter(|i| i % 100 >= 50)
            .map(|i| format!("p{i:05}"))
            .collect();
        let Applied::Done(first) = managed_segments::apply_evaluation(
            &db.conn,
            ws,
            77,
            0,
            &score_at_least(50.0),
            &Scope::Full,
            ts(2),
        )
        .await?
        else {
            return Err("stale".into());
        };
        assert_eq!(
            (
                first.added,
                first.removed,
                first.member_count,
                first.outbox_rows
            ),
            (1300, 0, 1300, 2)
        );
        let rows = outbox_rows(&db, ws).await?;
        assert_eq!(carried(&rows, Kind::SegmentAdd, 77)?, expected);
        assert_eq!(members(&db, ws, 77).await?, expected);
        let seg = managed_segments::get(&db.conn, ws, 77)
            .await?
            .ok_or("segment")?;
        assert!(!seg.evaluation_due && seg.member_count == 1300);
        assert_eq!(
            seg.last_evaluation
                .as_ref()
                .map(|e| (e.added, e.removed, e.evaluated_at)),
            Some((1300, 0, ts(2)))
        );
        let mirror = segments::get(&db.conn, ws, 77).await?.ok_or("mirror row")?;
        assert_eq!(
            (mirror.member_count, mirror.counted_at),
            (Some(1300), Some(ts(2)))
        );

        // Nothing changed: nothing queued.
        let Applied::Done(again) = managed_segments::apply_evaluation(
            &db.conn,
            ws,
            77,
            0,
            &score_at_least(50.0),
            &Scope::Full,
            ts(3),
        )
        .await?
        else {
            return Err("stale".into());
        };
        assert_eq!((again.added, again.removed, again.outbox_rows), (0, 0, 0));
        assert_eq!(outbox_rows(&db, ws).await?.len(), rows.len());

        // Two people change (SharpSend writes JSON numbers): exactly they move.
        let updates = vec![
            NewAttributeUpdate {
                customer_id: "p00051".into(),
                attributes: attrs(json!({"score": 3})),
            },
            NewAttributeUpdate {
                customer_id: "p00002".into(),
                attributes: attrs(json!({"score": 99})),
            },
        ];
        outbox::accept_attribute_updates(&db.conn, ws, &updates, ts(4)).await?;
        let before = outbox_rows(&db, ws).await?.len();
        let Applied::Done(moved) = managed_segments::apply_evaluation(
            &db.conn,
            ws,
            77,
            0,
            &score_at_least(50.0),
            &Scope::Full,
            ts(5),
        )
        .await?
        else {
            return Err("stale".into());
        };
        assert_eq!(
            (
                moved.added,
                moved.removed,
                moved.member_count,
                moved.outbox_rows
            ),
            (1, 1, 1300, 2)
        );
        let new_rows: Vec<OutboxRow> = outbox_rows(&db, ws)
            .await?
            .into_iter()
            .skip(before)
            .collect();
        assert_eq!(
            carried(&new_rows, Kind::SegmentAdd, 77)?,
            BTreeSet::from(["p00002".to_owned()])
        );
        assert_eq!(
            carried(&new_rows, Kind::SegmentRemove, 77)?,
            BTreeSet::from(["p00051".to_owned()])
        );

        // A new threshold removes 1000+ people: removals are chunked too.
        let before = outbox_rows(&db, ws).await?.len();
        let Applied::Done(shrunk) = managed_segments::apply_evaluation(
            &db.conn,
            ws,
            77,
            0,
            &score_at_least(99.0),
            &Scope::Full,
            ts(6),
        )
        .await?
        else {
            return Err("stale".into());
        };
        assert_eq!(
            (shrunk.added, shrunk.removed, shrunk.member_count),
            (0, 1273, 27)
        );
        let new_rows: Vec<OutboxRow> = outbox_rows(&db, ws)
            .await?
            .into_iter()
            .skip(before)
            .collect();
        assert_eq!(new_rows.len(), 2);
        assert_eq!(carried(&new_rows, Kind::SegmentRemove, 77)?.len(), 1273);
        assert_eq!(members(&db, ws, 77).await?.len(), 27);

        // Criteria changed since the filter was built: nothing is applied.
        managed_segments::update(
            &db.conn,
            ws,
            77,
            &SegmentUpdate {
                criteria: Some(Some(criteria("score"))),
                ..Default::default()
            },
            ts(7),
        )
        .await?;
        let stale = managed_segments::apply_evaluation(
            &db.conn,
            ws,
            77,
            0,
            &score_at_least(0.0),
            &Scope::Full,
            ts(8),
        )
        .await?;
        assert_eq!(stale, Applied::Stale);
        assert_eq!(members(&db, ws, 77).await?.len(), 27);
        let seg = managed_segments::get(&db.conn, ws, 77)
            .await?
            .ok_or("segment")?;
        assert!(seg.evaluation_due && seg.revision == 1);
        assert_eq!(
            managed_segments::apply_evaluation(
                &db.conn,
                ws,
                999,
                0,
                &score_at_least(0.0),
                &Scope::Full,
                ts(8)
            )
            .await?,
            Applied::Stale
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    manual_membership_is_recorded_and_queued_and_delivery_sees_the_latest_state,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let new = |id: i64, criteria| NewManagedSegment {
            cio_segment_id: id,
            name: format!("s{id}"),
            description: Some("d".into()),
            criteria,
            completes: None,
        };
        managed_segments::create(&db.conn, ws, &new(5, None), ts(0)).await?;
        managed_segments::create(&db.conn, ws, &new(6, Some(criteria("score"))), ts(0)).await?;
        let ids: Vec<String> = (0..2500).map(|i| format!("c{i:05}")).collect();

        let ManualChange::Done(added) =
            managed_segments::add_members(&db.conn, ws, 5, &ids, ts(1)).await?
        else {
            return Err("not added".into());
        };
        assert_eq!(
            (
                added.changed,
                added.queued_ids,
                added.outbox_rows,
                added.member_count
            ),
            (2500, 2500, 3, 2500)
        );
        // Adding again changes nothing recorded but is queued again (harmless, repairs drift).
        let ManualChange::Done(again) =
            managed_segments::add_members(&db.conn, ws, 5, &ids[..10], ts(2)).await?
        else {
            return Err("not added".into());
        };
        assert_eq!(
            (again.changed, again.queued_ids, again.member_count),
            (0, 10, 2500)
        );
        let gone: Vec<String> = vec!["c00001".into(), "c00002".into(), "nobody".into()];
        let ManualChange::Done(removed) =
            managed_segments::remove_members(&db.conn, ws, 5, &gone, ts(3)).await?
        else {
            return Err("not removed".into());
        };
        assert_eq!(
            (removed.changed, removed.queued_ids, removed.member_count),
            (2, 3, 2498)
        );
        assert_eq!(
            managed_segments::add_members(&db.conn, ws, 6, &ids, ts(4)).await?,
            ManualChange::HasCriteria
        );
        assert_eq!(
            managed_segments::add_members(&db.conn, ws, 404, &ids, ts(4)).await?,
            ManualChange::NotFound
        );

        let rows = outbox_rows(&db, ws).await?;
        assert_eq!(rows.len(), 5);
        assert_eq!(carried(&rows[..3], Kind::SegmentAdd, 5)?.len(), 2500);
        assert_eq!(carried(&rows[4..], Kind::SegmentRemove, 5)?.len(), 3);

        // The worker asks which ids are still members: the first add row is now partly stale.
        let probe = ["c00000", "c00001", "c00002", "nobody"];
        let still = managed_segments::members_among(&db.conn, ws, 5, &probe)
            .await?
            .ok_or("managed")?;
        assert_eq!(still, ["c00000".to_owned()].into_iter().collect());
        assert!(
            managed_segments::members_among(&db.conn, ws, 404, &probe)
                .await?
                .is_none()
        );

        // Deleting forgets the membership; queued rows then have nothing left to deliver.
        assert!(managed_segments::delete(&db.conn, ws, 5, ts(5)).await?);
        assert!(!managed_segments::delete(&db.conn, ws, 5, ts(5)).await?);
        assert!(
            managed_segments::members_among(&db.conn, ws, 5, &probe)
                .await?
                .is_none()
        );
        assert!(members(&db, ws, 5).await?.is_empty());
        let mirror = segments::get(&db.conn, ws, 5).await?.ok_or("mirror row")?;
        assert!(mirror.removed && mirror.removed_at == Some(ts(5)));
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    profile_changes_mark_only_the_segments_that_read_them_due,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        for (id, attribute) in [(1, "score"), (2, "plan"), (3, "score")] {
            managed_segments::create(
                &db.conn,
                ws,
                &NewManagedSegment {
                    cio_segment_id: id,
                    name: "x".into(),
                    description: None,
                    criteria: Some(criteria(attribute)),
                    completes: None,
                },
                ts(0),
            )
            .await?;
            let Applied::Done(_) = managed_segments::apply_evaluation(
                &db.conn,
                ws,
                id,
                0,
                &score_at_least(0.0),
                &Scope::Full,
                ts(1),
            )
            .await?
            else {
                return Err("stale".into());
            };
        }
        managed_segments::create(
            &db.conn,
            ws,
            &NewManagedSegment {
                cio_segment_id: 4,
                name: "manual".into(),
                description: None,
                criteria: None,
                completes: None,
            },
            ts(0),
        )
        .await?;
        assert!(managed_segments::due(&db.conn, ws, ts(0)).await?.is_empty());
        assert_eq!(
            managed_segments::mark_due_for_attributes(&db.conn, ws, &["plan", "other"]).await?,
            1
        );
        let due: Vec<i64> = managed_segments::due(&db.conn, ws, ts(0))
            .await?
            .iter()
            .map(|s| s.cio_segment_id)
            .collect();
        assert_eq!(due, vec![2]);
        // Stale ones are due too (relative times move on without any profile changing).
        let due: Vec<i64> = managed_segments::due(&db.conn, ws, ts(2))
            .await?
            .iter()
            .map(|s| s.cio_segment_id)
            .collect();
        assert_eq!(due, vec![1, 2, 3]);
        // Every segment with criteria, the one already due included.
        assert_eq!(managed_segments::mark_all_due(&db.conn, ws).await?, 3);
        let due: Vec<i64> = managed_segments::due(&db.conn, ws, ts(0))
            .await?
            .iter()
            .map(|s| s.cio_segment_id)
            .collect();
        assert_eq!(due, vec![1, 2, 3]);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    the_outbox_accepts_segment_kinds_and_still_refuses_unknown_ones,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        managed_segments::create(
            &db.conn,
            ws,
            &NewManagedSegment {
                cio_segment_id: 9,
                name: "m".into(),
                description: None,
                criteria: None,
                completes: None,
            },
            ts(0),
        )
        .await?;
        managed_segments::add_members(&db.conn, ws, 9, &["a".to_owned()], ts(1)).await?;
        let rows = outbox_rows(&db, ws).await?;
        assert_eq!(
            rows.iter().map(|r| r.kind).collect::<Vec<_>>(),
            vec![Kind::SegmentAdd]
        );
        assert_eq!(rows[0].payload, json!({"segment_id": 9, "ids": ["a"]}));
        // Claimed and settled like any other row.
        let claimed = outbox::claim_due(
            &db.conn,
            ws,
            "w",
            10,
            std::time::Duration::from_secs(60),
            ts(2),
        )
        .await?;
        assert_eq!(claimed.len(), 1);
        assert_eq!(
            outbox::mark_delivered(&db.conn, "w", &[claimed[0].id], ts(3)).await?,
            1
        );

        let backend = db.conn.get_database_backend();
        let payload = if backend == DbBackend::Postgres {
            "'{}'::jsonb"
        } else {
            "'{}'"
        };
        let sql = format!(
            "INSERT INTO outbox (workspace_id, kind, customer_id, payload, status, attempts, next_attempt_at, created_at) \
             VALUES ({ws}, 'bogus', 'x', {payload}, 'pending', 0, '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z')"
        );
        let refused = db
            .conn
            .execute_raw(Statement::from_string(backend, sql))
            .await;
        assert!(refused.is_err(), "an unknown kind was accepted");
        TestResult::Ok(())
    }
);

async fn manual_segment(db: &TestDatabase, ws: i64, id: i64) -> Res<()> {
    managed_segments::create(
        &db.conn,
        ws,
        &NewManagedSegment {
            cio_segment_id: id,
            name: format!("manual {id}"),
            description: None,
            criteria: None,
            completes: None,
        },
        ts(0),
    )
    .await?;
    Ok(())
}

sharpsend_db::db_test!(
    a_segments_later_membership_change_is_not_claimed_while_an_earlier_one_is_in_flight,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let minute = std::time::Duration::from_secs(60);
        manual_segment(&db, ws, 9).await?;
        manual_segment(&db, ws, 10).await?;
        let x = || vec!["x".to_owned()];
        managed_segments::add_members(&db.conn, ws, 9, &x(), ts(1)).await?;
        managed_segments::remove_members(&db.conn, ws, 9, &x(), ts(2)).await?;
        managed_segments::add_members(&db.conn, ws, 10, &x(), ts(3)).await?;
        let rows = outbox_rows(&db, ws).await?;
        let (add9, remove9, add10) = (rows[0].id, rows[1].id, rows[2].id);

        let first = outbox::claim_due(&db.conn, ws, "w1", 1, minute, ts(4)).await?;
        assert_eq!(first.iter().map(|r| r.id).collect::<Vec<_>>(), [add9]);
        // Another worker must not send the remove while the add may still be on its way.
        let second = outbox::claim_due(&db.conn, ws, "w2", 10, minute, ts(4)).await?;
        assert_eq!(second.iter().map(|r| r.id).collect::<Vec<_>>(), [add10]);
        // Retried later: the remove still waits behind it.
        outbox::mark_retry(&db.conn, "w1", &[add9], "HTTP 503", ts(30), ts(5)).await?;
        assert!(
            outbox::claim_due(&db.conn, ws, "w2", 10, minute, ts(6))
                .await?
                .is_empty()
        );
        let both = outbox::claim_due(&db.conn, ws, "w2", 10, minute, ts(30)).await?;
        assert_eq!(
            both.iter().map(|r| r.id).collect::<Vec<_>>(),
            [add9, remove9]
        );
        TestResult::Ok(())
    }
);

/// How many sessions of this database wait for a lock (seen from another session).
async fn lock_waiters(conn: &sea_orm::DatabaseConnection) -> Res<i64> {
    let row = conn
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT COUNT(*) AS n FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        ))
        .await?
        .ok_or("no row")?;
    Ok(row.try_get::<i64>("", "n")?)
}

/// Waits (polling another session, at most 20 s) until `n` sessions wait for a lock or `done`
/// says the awaited work finished without waiting.
async fn until_waiting(
    conn: &sea_orm::DatabaseConnection,
    n: i64,
    done: impl Fn() -> bool,
) -> Res<()> {
    let started = std::time::Instant::now();
    while lock_waiters(conn).await? < n && !done() {
        if started.elapsed() > std::time::Duration::from_secs(20) {
            return Err(format!("no {n} lock waiters within 20 s").into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(())
}

/// PostgreSQL: an evaluation holds its segment row from its start to its commit and reads the
/// profiles as of one snapshot. A change committed meanwhile — to an attribute the criteria
/// read (`mark_due_for_attributes`) or to a segment they read (`mark_dependents_due`, through
/// a membership change) — must not wait for the evaluation, and must not be lost: once the
/// evaluation has committed, the change log still shows it (`has_changes`) and the next
/// incremental evaluation applies it. The evaluation is held mid-statement by a second
/// connection locking a membership row it must delete.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_committed_during_an_evaluation_neither_waits_nor_is_lost_on_postgres() {
    use sea_orm::TransactionTrait;
    use sharpsend_db::testing::{Backend, run};

    run(Backend::Postgres, true, |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let watcher = db.connect_again().await?;
        profiles::upsert_fetched(&db.conn, ws, &[person(1, 90), person(2, 90)], ts(0)).await?;
        manual_segment(&db, ws, 4).await?;
        managed_segments::add_members(&db.conn, ws, 4, &["p00001".to_owned()], ts(0)).await?;
        for (id, stored) in [
            (5, criteria("score")),
            (
                6,
                StoredCriteria {
                    criteria: json!({"segment": {"id": 4}}),
                    referenced_attributes: vec![],
                    referenced_segments: vec![4],
                },
            ),
        ] {
            managed_segments::create(
                &db.conn,
                ws,
                &NewManagedSegment {
                    cio_segment_id: id,
                    name: format!("s{id}"),
                    description: None,
                    criteria: Some(stored),
                    completes: None,
                },
                ts(0),
            )
            .await?;
        }
        let filter_of = |id: i64| {
            if id == 5 {
                score_at_least(50.0)
            } else {
                Filter::InSegment { segment_id: 4 }
            }
        };
        let filters = [(5, filter_of(5), "p00002"), (6, filter_of(6), "p00001")];
        for (id, filter, _) in &filters {
            let Applied::Done(_) = managed_segments::apply_evaluation(
                &db.conn,
                ws,
                *id,
                0,
                filter,
                &Scope::Full,
                ts(1),
            )
            .await?
            else {
                return Err("stale".into());
            };
        }
        // p00002 drops out of 5 and p00001 out of 4 (so out of 6): both due.
        outbox::accept_attribute_updates(
            &db.conn,
            ws,
            &[NewAttributeUpdate {
                customer_id: "p00002".into(),
                attributes: attrs(json!({"score": 10})),
            }],
            ts(2),
        )
        .await?;
        managed_segments::mark_due_for_attributes(&db.conn, ws, &["score"]).await?;
        managed_segments::remove_members(&db.conn, ws, 4, &["p00001".to_owned()], ts(2)).await?;

        for (id, filter, leaving) in filters {
            assert!(
                managed_segments::get(&db.conn, ws, id)
                    .await?
                    .ok_or("segment")?
                    .evaluation_due
            );
            // Hold the evaluation after its snapshot: lock the membership row it must delete.
            let blocker = db.connect_again().await?;
            let hold = blocker.begin().await?;
            hold.execute_unprepared(&format!(
                "SELECT 1 FROM segment_members WHERE segment_id = {id} \
                 AND customer_id = '{leaving}' FOR UPDATE"
            ))
            .await?;
            let conn = db.connect_again().await?;
            let evaluation = tokio::spawn(async move {
                managed_segments::apply_evaluation(&conn, ws, id, 0, &filter, &Scope::Full, ts(3))
                    .await
            });
            until_waiting(&watcher, 1, || evaluation.is_finished()).await?;

            // Committed during the evaluation: p00003 now matches both.
            let conn = db.connect_again().await?;
            let change = tokio::spawn(async move {
                if id == 5 {
                    outbox::accept_attribute_updates(
                        &conn,
                        ws,
                        &[NewAttributeUpdate {
                            customer_id: "p00003".into(),
                            attributes: attrs(json!({"score": 99})),
                        }],
                        ts(4),
                    )
                    .await?;
                    managed_segments::mark_due_for_attributes(&conn, ws, &["score"]).await?;
                } else {
                    managed_segments::add_members(&conn, ws, 4, &["p00003".to_owned()], ts(4))
                        .await?;
                }
                Ok::<_, sharpsend_db::DbError>(())
            });
            // The change and its mark do not wait for the evaluation.
            tokio::time::timeout(std::time::Duration::from_secs(10), change).await???;
            assert!(
                !evaluation.is_finished(),
                "segment {id}: the evaluation is still held"
            );
            hold.rollback().await?;
            let Applied::Done(outcome) = evaluation.await?? else {
                return Err("stale".into());
            };
            assert_eq!((outcome.added, outcome.removed), (0, 1), "segment {id}");
            assert!(
                !members(&db, ws, id).await?.contains("p00003"),
                "the evaluation's snapshot predates the change"
            );
            let segment = managed_segments::get(&db.conn, ws, id)
                .await?
                .ok_or("segment")?;
            assert!(
                managed_segments::has_changes(&db.conn, &segment).await?,
                "segment {id}: the change committed during its evaluation was lost"
            );
            let Applied::Done(next) = managed_segments::apply_evaluation(
                &db.conn,
                ws,
                id,
                0,
                &filter_of(id),
                &Scope::Incremental {
                    since: ts(3),
                    windows: vec![],
                },
                ts(5),
            )
            .await?
            else {
                return Err("stale".into());
            };
            assert_eq!(
                (next.added, next.removed, next.incremental),
                (1, 0, true),
                "segment {id}"
            );
            assert!(
                members(&db, ws, id).await?.contains("p00003"),
                "segment {id}"
            );
        }
        TestResult::Ok(())
    })
    .await;
}

/// Rows of the workspace's change log.
async fn log_rows(db: &TestDatabase, ws: i64) -> Res<i64> {
    log_rows_below(db, ws, i64::MAX).await
}

async fn log_rows_below(db: &TestDatabase, ws: i64, pos: i64) -> Res<i64> {
    use sea_orm::ConnectionTrait;
    let row = db
        .conn
        .query_one_raw(sea_orm::Statement::from_string(
            db.conn.get_database_backend(),
            format!(
                "SELECT COUNT(*) AS n FROM profile_changes \
                 WHERE workspace_id = {ws} AND pos < {pos}"
            ),
        ))
        .await?
        .ok_or("count")?;
    Ok(row.try_get("", "n")?)
}

/// PostgreSQL: pruning the change log neither waits for an evaluation in flight nor takes rows
/// from under it (it skips; a later prune drops only what no segment needs), and a due mark
/// never waits for either. The case that needs it: a first, full evaluation (no watermark yet)
/// whose snapshot did not see a write that commits while it runs — pruned then (below the
/// oldest transaction still running), that write would never be re-checked.
#[tokio::test(flavor = "multi_thread")]
async fn pruning_skips_while_an_evaluation_runs_and_loses_nothing_on_postgres() {
    use sea_orm::TransactionTrait;
    use sharpsend_db::testing::{Backend, run};

    run(Backend::Postgres, true, |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let watcher = db.connect_again().await?;
        profiles::upsert_fetched(
            &db.conn,
            ws,
            &[person(1, 90), person(2, 90), person(3, 10)],
            ts(0),
        )
        .await?;
        managed_segments::create(
            &db.conn,
            ws,
            &NewManagedSegment {
                cio_segment_id: 5,
                name: "s5".into(),
                description: None,
                criteria: Some(criteria("score")),
                completes: None,
            },
            ts(0),
        )
        .await?;
        let evaluate = |conn, scope: Scope, at| async move {
            match managed_segments::apply_evaluation(
                &conn,
                ws,
                5,
                0,
                &score_at_least(50.0),
                &scope,
                at,
            )
            .await?
            {
                Applied::Done(outcome) => {
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(outcome)
                }
                Applied::Stale => Err("stale".into()),
            }
        };
        // A write in flight before the evaluation starts: p00003 will match.
        let writer = db.connect_again().await?;
        let write = writer.begin().await?;
        write
            .execute_unprepared(&format!(
                "UPDATE profiles SET attributes = attributes || '{{\"score\": 99}}' \
                 WHERE workspace_id = {ws} AND customer_id = 'p00003'"
            ))
            .await?;
        // The first evaluation is held on a member row another transaction is inserting.
        let blocker = db.connect_again().await?;
        let hold = blocker.begin().await?;
        hold.execute_unprepared(&format!(
            "INSERT INTO segment_members (workspace_id, segment_id, customer_id) \
             VALUES ({ws}, 5, 'p00001')"
        ))
        .await?;
        let evaluation = tokio::spawn(evaluate(db.connect_again().await?, Scope::Full, ts(1)));
        until_waiting(&watcher, 1, || evaluation.is_finished()).await?;
        write.commit().await?;

        // Neither the mark nor the prune waits; the prune drops nothing.
        let limit = std::time::Duration::from_secs(10);
        tokio::time::timeout(
            limit,
            managed_segments::mark_due_for_attributes(&db.conn, ws, &["score"]),
        )
        .await??;
        let logged = log_rows(&db, ws).await?;
        let dropped =
            tokio::time::timeout(limit, managed_segments::prune_changes(&db.conn, ws)).await??;
        assert_eq!(dropped, 0, "an evaluation is running: the prune skips");
        assert_eq!(log_rows(&db, ws).await?, logged);
        assert!(!evaluation.is_finished());

        hold.rollback().await?;
        let outcome = evaluation.await??;
        assert_eq!(
            (outcome.added, outcome.removed),
            (2, 0),
            "its snapshot predates the write"
        );
        // Pruned now, the log keeps what the segment has not seen; the next evaluation
        // applies it.
        managed_segments::prune_changes(&db.conn, ws).await?;
        let segment = managed_segments::get(&db.conn, ws, 5)
            .await?
            .ok_or("segment")?;
        assert!(managed_segments::has_changes(&db.conn, &segment).await?);
        let next = evaluate(
            db.conn.clone(),
            Scope::Incremental {
                since: ts(1),
                windows: vec![],
            },
            ts(2),
        )
        .await?;
        assert_eq!(
            (next.added, next.removed),
            (1, 0),
            "the write during the evaluation was lost"
        );
        assert!(members(&db, ws, 5).await?.contains("p00003"));
        // No evaluation runs now: the prune drops exactly the rows below the segment's
        // watermark (a snapshot's oldest running transaction, cluster-wide: another test's open
        // transaction can hold it below the write's row, so the count is not fixed) and keeps
        // the last evaluation's own member row.
        let watermark = managed_segments::get(&db.conn, ws, 5)
            .await?
            .ok_or("segment")?
            .change_watermark
            .ok_or("watermark")?;
        let below = log_rows_below(&db, ws, watermark).await?;
        let dropped = managed_segments::prune_changes(&db.conn, ws).await?;
        assert_eq!(i64::try_from(dropped)?, below);
        assert_eq!(log_rows_below(&db, ws, watermark).await?, 0);
        assert!(log_rows(&db, ws).await? >= 1);
        TestResult::Ok(())
    })
    .await;
}

sharpsend_db::db_test!(
    a_record_completes_its_create_key_in_its_own_transaction,
    |db: TestDatabase| async move {
        use sharpsend_db::idempotency::{self, Claim, KeyRef};
        let ws = workspace(&db, "site-1").await?;
        let key = |request_id: &str| KeyRef {
            operation: "CreateSegment".into(),
            request_id: request_id.into(),
        };
        let new = |cio_segment_id: i64, completes: KeyRef| NewManagedSegment {
            cio_segment_id,
            name: "made once".into(),
            description: None,
            criteria: None,
            completes: Some(completes),
        };
        for request_id in ["first", "second"] {
            let claim =
                idempotency::claim(&db.conn, ws, "CreateSegment", request_id, &json!({}), ts(0))
                    .await?;
            assert_eq!(claim, Claim::New);
        }

        // The record and the key's result commit together.
        managed_segments::create(&db.conn, ws, &new(31, key("first")), ts(1)).await?;
        let first = idempotency::get(&db.conn, ws, "CreateSegment", "first")
            .await?
            .ok_or("first key")?;
        assert_eq!(first.result_id, Some(31));

        // A record that cannot be made (segment 31 is recorded already) leaves its key as it was:
        // without a result, so that the call's failure releases it.
        assert!(
            managed_segments::create(&db.conn, ws, &new(31, key("second")), ts(2))
                .await
                .is_err()
        );
        let second = idempotency::get(&db.conn, ws, "CreateSegment", "second")
            .await?
            .ok_or("second key")?;
        assert_eq!(second.result_id, None);
        // A key that is not claimed cannot be completed: the record is not made either.
        assert!(
            managed_segments::create(&db.conn, ws, &new(32, key("never claimed")), ts(3))
                .await
                .is_err()
        );
        assert!(managed_segments::get(&db.conn, ws, 32).await?.is_none());
        TestResult::Ok(())
    }
);
