//! The campaign mirror (`sharpsend_db::campaigns`) and metric targets and snapshots
//! (`sharpsend_db::metrics`).

use std::collections::BTreeMap;

use sharpsend_db::campaigns::{self, CampaignKind, SyncCounts, SyncedCampaign};
use sharpsend_db::metrics::{self, NewSnapshot, TargetSeen, TargetSyncCounts};
use sharpsend_db::testing::{TestDatabase, TestResult};

use crate::helpers::{ts, workspace};

fn item(kind: CampaignKind, cio_id: i64, name: &str) -> SyncedCampaign {
    SyncedCampaign {
        kind,
        cio_id,
        name: name.to_owned(),
        campaign_type: Some("segment".to_owned()),
        state: Some("running".to_owned()),
        cio_created_at: Some(ts(-86_400)),
        cio_updated_at: Some(ts(-3600)),
        sent_at: None,
        tags: vec!["a".to_owned(), "b".to_owned()],
    }
}

fn keys(records: &[campaigns::CampaignRecord]) -> Vec<(CampaignKind, i64)> {
    records
        .iter()
        .map(|r| (r.item.kind, r.item.cio_id))
        .collect()
}

sharpsend_db::db_test!(
    sync_keys_by_kind_and_id_and_marks_removed,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-campaigns").await?;
        let other = workspace(&db, "site-other").await?;
        use CampaignKind::*;
        let mut newsletter = item(Newsletter, 1, "Weekly Wrap");
        newsletter.sent_at = Some(ts(-600));
        newsletter.state = Some("sent".to_owned());
        let first = vec![
            item(Campaign, 1, "Welcome"),
            item(Broadcast, 3, "Alert"),
            item(Campaign, 2, "Win-back"),
            newsletter.clone(),
            item(Newsletter, 2, "Draft"),
        ];
        let (counts, removed) = campaigns::apply_sync(&db.conn, ws, &first, ts(0)).await?;
        assert_eq!(
            counts,
            SyncCounts {
                created: 5,
                ..Default::default()
            }
        );
        assert!(removed.is_empty());
        campaigns::apply_sync(&db.conn, other, &[item(Campaign, 1, "Elsewhere")], ts(0)).await?;

        // By kind (campaigns, broadcasts, newsletters) then id; id 1 exists as a campaign and
        // as a newsletter.
        let all = campaigns::list(&db.conn, ws, None, None, 100).await?;
        assert_eq!(
            keys(&all),
            vec![
                (Campaign, 1),
                (Campaign, 2),
                (Broadcast, 3),
                (Newsletter, 1),
                (Newsletter, 2)
            ]
        );
        let got = campaigns::get(&db.conn, ws, Newsletter, 1)
            .await?
            .ok_or("newsletter 1")?;
        assert_eq!(got.item.name, "Weekly Wrap");
        assert_eq!(got.item.sent_at, Some(ts(-600)));
        assert_eq!(got.item.tags, vec!["a", "b"]);
        assert_eq!(got.synced_at, ts(0));
        assert_eq!(got.item.cio_created_at, Some(ts(-86_400)));

        // Keyset pages across kinds, and the kind filter.
        let page1 = campaigns::list(&db.conn, ws, None, None, 2).await?;
        let page2 = campaigns::list(&db.conn, ws, None, Some((Campaign, 2)), 2).await?;
        let page3 = campaigns::list(&db.conn, ws, None, Some((Newsletter, 1)), 2).await?;
        assert_eq!(keys(&page1), vec![(Campaign, 1), (Campaign, 2)]);
        assert_eq!(keys(&page2), vec![(Broadcast, 3), (Newsletter, 1)]);
        assert_eq!(keys(&page3), vec![(Newsletter, 2)]);
        assert_eq!(
            campaigns::list(&db.conn, ws, None, None, u64::MAX)
                .await?
                .len(),
            5,
            "no limit"
        );
        let newsletters = campaigns::list(&db.conn, ws, Some(Newsletter), None, 100).await?;
        assert_eq!(keys(&newsletters), vec![(Newsletter, 1), (Newsletter, 2)]);
        let after =
            campaigns::list(&db.conn, ws, Some(Campaign), Some((Broadcast, 3)), 100).await?;
        assert!(after.is_empty());

        // Second listing: one renamed, one gone, one unchanged.
        let mut renamed = item(Broadcast, 3, "Assignment Alert");
        renamed.tags = vec!["sharpsend".to_owned()];
        let second = vec![
            item(Campaign, 1, "Welcome"),
            renamed,
            newsletter.clone(),
            item(Newsletter, 2, "Draft"),
        ];
        let (counts, removed) = campaigns::apply_sync(&db.conn, ws, &second, ts(60)).await?;
        assert_eq!(
            counts,
            SyncCounts {
                created: 0,
                updated: 1,
                removed: 1,
                unchanged: 3
            }
        );
        assert_eq!(removed, vec![(Campaign, 2)]);
        let listed = campaigns::list(&db.conn, ws, None, None, 100).await?;
        assert_eq!(
            keys(&listed),
            vec![
                (Campaign, 1),
                (Broadcast, 3),
                (Newsletter, 1),
                (Newsletter, 2)
            ]
        );
        assert!(listed.iter().all(|r| r.synced_at == ts(60)));
        let gone = campaigns::get(&db.conn, ws, Campaign, 2)
            .await?
            .ok_or("kept")?;
        assert_eq!((gone.removed_at, gone.synced_at), (Some(ts(60)), ts(0)));
        let alert = campaigns::get(&db.conn, ws, Broadcast, 3)
            .await?
            .ok_or("alert")?;
        assert_eq!(
            (alert.item.name.as_str(), alert.item.tags.clone()),
            ("Assignment Alert", vec!["sharpsend".to_owned()])
        );

        // It comes back.
        let (counts, removed) = campaigns::apply_sync(&db.conn, ws, &first, ts(120)).await?;
        assert_eq!(counts.updated, 2, "{counts:?}"); // restored + renamed back
        assert!(removed.is_empty());
        assert_eq!(
            campaigns::get(&db.conn, ws, Campaign, 2)
                .await?
                .and_then(|r| r.removed_at),
            None
        );

        // The other workspace is untouched.
        assert_eq!(
            keys(&campaigns::list(&db.conn, other, None, None, 100).await?),
            vec![(Campaign, 1)]
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    upsert_one_inserts_updates_and_restores,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-upsert").await?;
        let mut n = item(CampaignKind::Newsletter, 7, "Created by a send");
        n.state = Some("draft".to_owned());
        campaigns::upsert_one(&db.conn, ws, &n, ts(0)).await?;
        n.state = Some("sent".to_owned());
        n.sent_at = Some(ts(5));
        campaigns::upsert_one(&db.conn, ws, &n, ts(10)).await?;
        let got = campaigns::get(&db.conn, ws, CampaignKind::Newsletter, 7)
            .await?
            .ok_or("upserted")?;
        assert_eq!(
            (got.item.state.as_deref(), got.item.sent_at, got.synced_at),
            (Some("sent"), Some(ts(5)), ts(10))
        );

        // Marked removed by a sync that does not list it, restored by the next upsert.
        campaigns::apply_sync(&db.conn, ws, &[], ts(20)).await?;
        assert!(
            campaigns::list(&db.conn, ws, None, None, 10)
                .await?
                .is_empty()
        );
        campaigns::upsert_one(&db.conn, ws, &n, ts(30)).await?;
        assert_eq!(
            campaigns::list(&db.conn, ws, None, None, 10).await?.len(),
            1
        );
        TestResult::Ok(())
    }
);

fn snapshot(polled_at_secs: i64, sent: Vec<u64>) -> NewSnapshot {
    NewSnapshot {
        polled_at: ts(polled_at_secs),
        res: "hours".to_owned(),
        start_at: ts(-7200),
        end_at: ts(polled_at_secs),
        series_start: ts(-7200),
        series: BTreeMap::from([
            ("sent".to_owned(), sent),
            ("opened".to_owned(), vec![0, 1, 2]),
        ]),
    }
}

sharpsend_db::db_test!(
    targets_are_due_when_watched_and_scheduled_by_polls,
    |db: TestDatabase| async move {
        use CampaignKind::*;
        let ws = workspace(&db, "site-targets").await?;
        let other = workspace(&db, "site-targets-other").await?;
        let t = metrics::watch(&db.conn, ws, Newsletter, 5, ts(-100), ts(-100), ts(0)).await?;
        assert_eq!(
            (
                t.window_start,
                t.active_since,
                t.next_poll_at,
                t.last_polled_at
            ),
            (ts(-100), ts(-100), Some(ts(0)), None)
        );
        metrics::watch(&db.conn, other, Newsletter, 5, ts(0), ts(0), ts(0)).await?;
        let b = metrics::watch(&db.conn, ws, Broadcast, 5, ts(-50), ts(-50), ts(1)).await?;
        assert_ne!(
            t.id, b.id,
            "a broadcast and a newsletter with the same id are two targets"
        );

        // Due: at or before now, most overdue first, this workspace only.
        assert!(metrics::due(&db.conn, ws, ts(-1), 10).await?.is_empty());
        let due = metrics::due(&db.conn, ws, ts(1), 10).await?;
        assert_eq!(
            due.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![t.id, b.id]
        );
        assert_eq!(metrics::due(&db.conn, ws, ts(1), 1).await?.len(), 1);
        assert_eq!(
            metrics::due(&db.conn, ws, ts(1), u64::MAX).await?.len(),
            2,
            "no limit"
        );

        // A poll stores the snapshot and schedules the next one; active_since only moves later.
        let stored = metrics::record_poll(
            &db.conn,
            &t,
            &snapshot(2, vec![1, 2, 3]),
            ts(-200),
            ts(302),
            3,
        )
        .await?;
        assert_eq!(stored.series["sent"], vec![1, 2, 3]);
        let polled = metrics::get_target(&db.conn, ws, Newsletter, 5)
            .await?
            .ok_or("target")?;
        assert_eq!(
            (
                polled.next_poll_at,
                polled.last_polled_at,
                polled.active_since
            ),
            (Some(ts(302)), Some(ts(2)), ts(-100))
        );
        assert_eq!(
            metrics::due(&db.conn, ws, ts(3), 10)
                .await?
                .iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
            vec![b.id]
        );
        let latest = metrics::latest_snapshot(&db.conn, t.id)
            .await?
            .ok_or("snapshot")?;
        assert_eq!(latest, stored);
        assert_eq!(
            (latest.res.as_str(), latest.series_start, latest.end_at),
            ("hours", ts(-7200), ts(2))
        );

        // Watching again: earlier window, later activity, due now (it was due later).
        let rewatched =
            metrics::watch(&db.conn, ws, Newsletter, 5, ts(-500), ts(50), ts(60)).await?;
        assert_eq!(
            (
                rewatched.window_start,
                rewatched.active_since,
                rewatched.next_poll_at
            ),
            (ts(-500), ts(50), Some(ts(60)))
        );
        // ...but never a later window, an earlier activity or a later due time.
        let again = metrics::watch(&db.conn, ws, Newsletter, 5, ts(0), ts(0), ts(70)).await?;
        assert_eq!(
            (again.window_start, again.active_since, again.next_poll_at),
            (ts(-500), ts(50), Some(ts(60)))
        );

        // History is bounded: the 3 newest stay.
        for i in 0..5 {
            metrics::record_poll(
                &db.conn,
                &t,
                &snapshot(100 + i, vec![i as u64]),
                ts(0),
                ts(400),
                3,
            )
            .await?;
        }
        assert_eq!(metrics::snapshot_count(&db.conn, t.id).await?, 3);
        let newest = metrics::latest_snapshot(&db.conn, t.id)
            .await?
            .ok_or("newest")?;
        assert_eq!(
            (newest.polled_at, newest.series["sent"].clone()),
            (ts(104), vec![4])
        );

        // Failures count up and are cleared by the next success.
        metrics::record_failure(
            &db.conn,
            t.id,
            "Customer.io App API server error (HTTP 500)",
            ts(460),
            ts(400),
        )
        .await?;
        metrics::record_failure(&db.conn, t.id, &"x".repeat(5000), ts(520), ts(460)).await?;
        let failed = metrics::get_target(&db.conn, ws, Newsletter, 5)
            .await?
            .ok_or("target")?;
        assert_eq!((failed.failures, failed.next_poll_at), (2, Some(ts(520))));
        assert_eq!(
            failed.last_error.as_ref().map(|e| e.chars().count()),
            Some(1000)
        );
        metrics::record_poll(
            &db.conn,
            &failed,
            &snapshot(530, vec![9]),
            ts(0),
            ts(830),
            3,
        )
        .await?;
        let ok = metrics::get_target(&db.conn, ws, Newsletter, 5)
            .await?
            .ok_or("target")?;
        assert_eq!(
            (ok.failures, ok.last_error, ok.next_poll_at),
            (0, None, Some(ts(830)))
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    sync_adds_deactivates_and_reactivates_targets,
    |db: TestDatabase| async move {
        use CampaignKind::*;
        let ws = workspace(&db, "site-target-sync").await?;
        let seen = |kind, cio_id, start: i64| TargetSeen {
            kind,
            cio_id,
            window_start: ts(start),
            active_since: ts(start),
        };
        // Watched by a send before any sync: its window starts at the local send time.
        metrics::watch(&db.conn, ws, Newsletter, 9, ts(-10), ts(-10), ts(0)).await?;
        let counts = metrics::apply_sync_targets(
            &db.conn,
            ws,
            &[seen(Campaign, 1, -86_400), seen(Newsletter, 9, -3600)],
            &[],
            ts(0),
        )
        .await?;
        assert_eq!(
            counts,
            TargetSyncCounts {
                added: 1,
                reactivated: 0,
                deactivated: 0
            }
        );
        // Customer.io's times are authoritative for the window.
        let n = metrics::get_target(&db.conn, ws, Newsletter, 9)
            .await?
            .ok_or("newsletter")?;
        assert_eq!((n.window_start, n.active_since), (ts(-3600), ts(-10)));

        // Polled, then removed in Customer.io: no longer due, and a poll does not bring it back.
        let c = metrics::get_target(&db.conn, ws, Campaign, 1)
            .await?
            .ok_or("campaign")?;
        let counts =
            metrics::apply_sync_targets(&db.conn, ws, &[], &[(Campaign, 1)], ts(10)).await?;
        assert_eq!(counts.deactivated, 1);
        metrics::record_poll(&db.conn, &c, &snapshot(20, vec![1]), ts(0), ts(30), 5).await?;
        let c = metrics::get_target(&db.conn, ws, Campaign, 1)
            .await?
            .ok_or("campaign")?;
        assert_eq!(c.next_poll_at, None);
        assert!(
            metrics::due(&db.conn, ws, ts(10_000), 10)
                .await?
                .iter()
                .all(|t| t.kind != Campaign)
        );

        // It reappears: due at once.
        let counts =
            metrics::apply_sync_targets(&db.conn, ws, &[seen(Campaign, 1, -86_400)], &[], ts(40))
                .await?;
        assert_eq!(
            counts,
            TargetSyncCounts {
                added: 0,
                reactivated: 1,
                deactivated: 0
            }
        );
        let c = metrics::get_target(&db.conn, ws, Campaign, 1)
            .await?
            .ok_or("campaign")?;
        assert_eq!(c.next_poll_at, Some(ts(40)));
        assert_eq!(c.window_start, ts(-86_400));
        TestResult::Ok(())
    }
);
