//! The per-delivery analytics facts (`analytics_deliveries`, folded by ingest): folds racing
//! on the same deliveries from two pools, in any order and batching, and events attributed
//! late, give the same facts as folding every event at once; folding again changes nothing; the
//! engagement scoring counts human opens and clicks as the analytics do.

use sea_orm::ConnectionTrait;
use serde_json::json;
use sharpsend_db::analytics::{self, DeliveryRow, Scope};
use sharpsend_db::engagement::{self, EventSource, NewDeliveryEvent};
use sharpsend_db::sends::{self, Created, Delivery, NewSend, NewSubmission};
use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::{DatabaseConnection, DbError};

use crate::helpers::{ts, workspace};

/// A late trigger id: events carry it before their submission knows it.
const LATE_TRIGGER: i64 = 9_001;

fn event(n: usize, d: usize, metric: &str, at: i64) -> NewDeliveryEvent {
    NewDeliveryEvent {
        event_id: format!("ev-{n}"),
        metric: metric.into(),
        object_type: "email".into(),
        delivery_id: Some(format!("d-{d:04}")),
        customer_id: Some(format!("p-{d:04}")),
        broadcast_id: Some(3),
        occurred_at: ts(at),
        ..NewDeliveryEvent::default()
    }
}

/// Webhook and poll events of 240 deliveries over two submissions (and a third known only by
/// a trigger id recorded later): prefetched and synthetic opens, machine clicks, bounces,
/// conversions, polled metrics where no webhook told, times spread over days.
fn history(subs: [i64; 2]) -> (Vec<NewDeliveryEvent>, Vec<NewDeliveryEvent>) {
    let (mut webhook, mut poll) = (Vec::new(), Vec::new());
    let mut n = 0;
    let mut push = |list: &mut Vec<NewDeliveryEvent>, d: usize, metric: &str, at: i64| {
        n += 1;
        let mut e = event(n, d, metric, at);
        if d % 6 == 5 {
            e.trigger_id = Some(LATE_TRIGGER);
        } else {
            e.submission_id = Some(subs[d % 2]);
        }
        list.push(e);
        n
    };
    for d in 0..240 {
        let sent = 86_400 * 20 + (d as i64 * 1_433) % (4 * 86_400);
        push(&mut webhook, d, "sent", sent);
        if d % 4 == 0 {
            // Only the poll told what happened next.
            push(&mut poll, d, "delivered", sent + 60);
            push(&mut poll, d, "opened", sent + 7_200);
            if d % 8 == 0 {
                push(&mut poll, d, "clicked", sent + 3_600);
            }
            continue;
        }
        if d % 13 == 0 {
            push(&mut webhook, d, "bounced", sent + 30);
            continue;
        }
        push(&mut webhook, d, "delivered", sent + 45);
        let i = push(&mut webhook, d, "opened", sent + (d as i64 % 9) * 3_000);
        if let Some(e) = webhook.iter_mut().find(|e| e.event_id == format!("ev-{i}")) {
            e.prefetched = d % 3 == 0;
        }
        if d % 5 == 0 {
            let i = push(&mut webhook, d, "clicked", sent + 900);
            if let Some(e) = webhook.iter_mut().find(|e| e.event_id == format!("ev-{i}")) {
                e.machine = d % 10 == 0;
            }
            let i = push(&mut webhook, d, "opened", sent + 901);
            if let Some(e) = webhook.iter_mut().find(|e| e.event_id == format!("ev-{i}")) {
                e.synthetic = true;
            }
        }
        if d % 7 == 0 {
            push(&mut webhook, d, "converted", sent + 86_400);
            push(&mut webhook, d, "unsubscribed", sent + 90_000);
        }
        if d % 17 == 0 {
            push(&mut webhook, d, "spammed", sent + 100);
        }
    }
    (webhook, poll)
}

async fn facts(db: &DatabaseConnection, ws: i64) -> Result<Vec<DeliveryRow>, DbError> {
    let scope = Scope {
        assignment_id: Some("asg-facts".into()),
        ..Default::default()
    };
    let (rows, next) = analytics::delivery_page(db, ws, &scope, None, 10_000).await?;
    assert!(next.is_none());
    Ok(rows)
}

sharpsend_db::db_test!(
    facts_folded_by_racing_ingest_equal_every_event_folded_at_once,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let new = NewSend {
            public_id: "snd_facts".into(),
            assignment_id: "asg-facts".into(),
            request_id: String::new(),
            title: "Q4".into(),
            subject: "Q4".into(),
            delivery: Delivery::Broadcast { broadcast_id: 3 },
            request: json!({}),
            created_by: "test".into(),
            submissions: [4, 5, 6]
                .iter()
                .map(|s| NewSubmission {
                    segment_id: *s,
                    subject: "Q4".into(),
                    body: "<p>x</p>".into(),
                    data: None,
                    recipients: json!({"segment": {"id": s}}),
                    marker: format!("ss:snd_facts:{s}"),
                })
                .collect(),
        };
        let (Created::New(send) | Created::Existing(send)) =
            sends::create(&db.conn, ws, &new, ts(0)).await?;
        let subs = sends::submissions(&db.conn, send.id).await?;
        let (webhook, poll) = history([subs[0].id, subs[1].id]);

        // Batches of 7 events, sources apart, interleaved and racing over two pools.
        let other = db.connect_again().await?;
        let mut batches: Vec<(EventSource, Vec<NewDeliveryEvent>)> = Vec::new();
        for chunk in webhook.chunks(7).rev() {
            batches.push((EventSource::Webhook, chunk.to_vec()));
        }
        for (i, chunk) in poll.chunks(7).enumerate() {
            batches.insert(
                i * 3 % (batches.len() + 1),
                (EventSource::Poll, chunk.to_vec()),
            );
        }
        let mut tasks = Vec::new();
        for (i, (source, batch)) in batches.into_iter().enumerate() {
            let conn = if i % 2 == 0 {
                db.conn.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                engagement::insert_events(&conn, ws, source, &batch, ts(0)).await
            }));
        }
        for t in tasks {
            t.await
                .map_err(|e| DbError::Db(sea_orm::DbErr::Custom(e.to_string())))??;
        }
        // A redelivered batch stores and folds nothing new.
        engagement::insert_events(&db.conn, ws, EventSource::Webhook, &webhook[..50], ts(0))
            .await?;
        let before_late = facts(&db.conn, ws).await?;
        assert!(
            before_late.iter().all(|r| r.segment_id != Some(6)),
            "unattributed events are not facts"
        );
        // The third submission learns its trigger: its events are attributed and folded.
        db.conn
            .execute_unprepared(&format!(
                "UPDATE send_submissions SET cio_trigger_id = {LATE_TRIGGER} WHERE id = {}",
                subs[2].id
            ))
            .await?;
        assert!(engagement::attribute_pending(&db.conn, ws).await? > 0);
        let raced = facts(&db.conn, ws).await?;
        assert_eq!(raced.len(), 240, "every delivery once");
        assert!(raced.iter().filter(|r| r.segment_id == Some(6)).count() == 40);
        assert!(
            raced
                .iter()
                .any(|r| r.click_at.is_some() && r.open_at.is_some())
        );
        assert!(raced.iter().any(|r| r.poll != 0 && r.click_at.is_some()));
        assert!(raced.iter().any(|r| r.bounced_at.is_some()));
        // The engagement scoring judges each delivery's human open and click by the same rule
        // (a link scanner's click and the synthetic open inferred from it are not a person's).
        let scored = engagement::delivery_facts(&db.conn, ws, "", 10_000).await?;
        assert_eq!(scored.len(), 240);
        for f in &scored {
            let Some(row) = raced.iter().find(|r| r.delivery_id == f.delivery_id) else {
                panic!("{} scored but not in the analytics", f.delivery_id);
            };
            assert_eq!(f.human_open, row.open_at.is_some(), "{f:?} vs {row:?}");
            assert_eq!(f.human_click, row.click_at.is_some(), "{f:?} vs {row:?}");
        }

        // Every event folded at once, as the migration's backfill groups them.
        let ids: Vec<i64> = engagement::events_after(&db.conn, ws, 0, None, 100_000)
            .await?
            .iter()
            .map(|e| e.id)
            .collect();
        db.conn
            .execute_unprepared("DELETE FROM analytics_deliveries")
            .await?;
        analytics::fold(&db.conn, &ids).await?;
        assert_eq!(facts(&db.conn, ws).await?, raced);
        // Folding again changes nothing.
        analytics::fold(&db.conn, &ids[..ids.len() / 2]).await?;
        assert_eq!(facts(&db.conn, ws).await?, raced);
        let until = ts(86_400 * 23).timestamp();
        let daily_from_until = |h: i64| if h < until { h } else { h - h % 86_400 };
        let hours =
            analytics::bucket_counts(&db.conn, ws, &Scope::default(), 0, daily_from_until).await?;
        let sent: i64 = hours
            .iter()
            .filter(|b| b.metric == "sent")
            .map(|b| b.count)
            .sum();
        assert_eq!(sent, 240);
        assert!(
            hours
                .iter()
                .any(|b| b.metric == "sent" && b.bucket % 86_400 != 0)
        );
        assert!(
            hours
                .iter()
                .any(|b| b.metric == "sent" && b.bucket >= until)
        );
        assert!(
            hours
                .iter()
                .filter(|b| b.bucket >= until && b.metric != "last_event_at")
                .all(|b| b.bucket % 86_400 == 0),
            "daily from the third midnight"
        );
        // Hours of a zone at UTC+5:30 start at half past: a time at hh:29:59 UTC is in the hour
        // from (hh-1):30, one at hh:30:00 in the hour from hh:30; every bucket against the
        // facts, edges included.
        let edge = 86_400 * 30 + 18 * 3600 + 1800;
        let mut edges = Vec::new();
        for (n, at) in [(0, edge - 1), (1, edge)] {
            let mut e = event(100_000 + n, 9_990 + n, "sent", at);
            e.submission_id = Some(subs[0].id);
            edges.push(e);
        }
        engagement::insert_events(&db.conn, ws, EventSource::Webhook, &edges, ts(0)).await?;
        let with_edges = facts(&db.conn, ws).await?;
        assert_eq!(with_edges.len(), raced.len() + 2);
        let shifted =
            analytics::bucket_counts(&db.conn, ws, &Scope::default(), 1800, |h| h).await?;
        let mut want: std::collections::BTreeMap<i64, i64> = std::collections::BTreeMap::new();
        for r in &with_edges {
            *want
                .entry(r.first_at - (r.first_at + 1800) % 3600)
                .or_default() += 1;
        }
        let got: std::collections::BTreeMap<i64, i64> = shifted
            .iter()
            .filter(|b| b.metric == "sent")
            .fold(Default::default(), |mut m, b| {
                *m.entry(b.bucket).or_default() += b.count;
                m
            });
        assert_eq!(got, want);
        assert!(got.keys().all(|h| h % 3600 == 1800));
        let edge = ts(edge).timestamp();
        assert_eq!(
            got.get(&(edge - 3600)),
            Some(&1),
            "hh:29:59 in the hour before"
        );
        assert_eq!(got.get(&edge), Some(&1), "hh:30:00 in its own hour");
        TestResult::Ok(())
    }
);
