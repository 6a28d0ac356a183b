use chrono::{DateTime, Duration, Utc};
use sharpsend_db::segments::{
    self, ListFilter, SegmentRecord, SyncCounts, SyncedSegment, TypeFilter,
};
use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::{DatabaseConnection, DbError};

use crate::helpers::{counted, seg, ts, workspace};

async fn all(db: &DatabaseConnection, ws: i64) -> Result<Vec<SegmentRecord>, DbError> {
    let filter = ListFilter {
        include_removed: true,
        ..ListFilter::default()
    };
    segments::list(db, ws, &filter, None, 1000).await
}

fn counts(created: u32, updated: u32, removed: u32, unchanged: u32) -> SyncCounts {
    SyncCounts {
        created,
        updated,
        removed,
        unchanged,
    }
}

sharpsend_db::db_test!(
    apply_sync_counts_every_kind_of_change,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let c = &db.conn;

        // 1. Everything is new.
        let first = vec![
            counted(1, "Growth Investors", 10, ts(0)),
            seg(2, "Crypto Enthusiasts", "manual"),
            counted(3, "Dormant", 5, ts(0)),
        ];
        assert_eq!(
            segments::apply_sync(c, ws, &first, ts(10)).await?,
            counts(3, 0, 0, 0)
        );
        let rows = all(c, ws).await?;
        assert_eq!(rows.iter().map(|r| r.cio_id).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(
            rows[0],
            SegmentRecord {
                workspace_id: ws,
                cio_id: 1,
                name: "Growth Investors".into(),
                description: None,
                segment_type: "dynamic".into(),
                member_count: Some(10),
                counted_at: Some(ts(0)),
                synced_at: ts(10),
                removed: false,
                removed_at: None,
            }
        );

        // 2. 1 unchanged, 2 renamed, 3 gone, 4 new.
        let second = vec![
            counted(1, "Growth Investors", 10, ts(0)),
            SyncedSegment {
                description: Some("renamed".into()),
                ..seg(2, "Crypto Fans", "manual")
            },
            seg(4, "New", "dynamic"),
        ];
        assert_eq!(
            segments::apply_sync(c, ws, &second, ts(20)).await?,
            counts(1, 1, 1, 1)
        );
        let one = segments::get(c, ws, 1).await?.ok_or("1 missing")?;
        assert_eq!(one.synced_at, ts(20), "seen rows get the new synced_at");
        let two = segments::get(c, ws, 2).await?.ok_or("2 missing")?;
        assert_eq!(
            (two.name.as_str(), two.description.as_deref()),
            ("Crypto Fans", Some("renamed"))
        );
        let three = segments::get(c, ws, 3).await?.ok_or("3 missing")?;
        assert!(three.removed);
        assert_eq!(three.removed_at, Some(ts(20)));
        assert_eq!(
            three.synced_at,
            ts(10),
            "synced_at is when it was last seen"
        );

        // 3. 1's count changes, 3 reappears, 4 gets only a new counted_at, 2 is unchanged.
        let third = vec![
            counted(1, "Growth Investors", 11, ts(25)),
            second[1].clone(),
            counted(3, "Dormant", 5, ts(0)),
            SyncedSegment {
                counted_at: Some(ts(26)),
                ..seg(4, "New", "dynamic")
            },
        ];
        assert_eq!(
            segments::apply_sync(c, ws, &third, ts(30)).await?,
            counts(0, 2, 0, 2)
        );
        let three = segments::get(c, ws, 3).await?.ok_or("3 missing")?;
        assert!(!three.removed);
        assert_eq!(three.removed_at, None);
        assert_eq!(three.synced_at, ts(30));
        let four = segments::get(c, ws, 4).await?.ok_or("4 missing")?;
        assert_eq!(four.counted_at, Some(ts(26)));
        assert_eq!(
            segments::get(c, ws, 1)
                .await?
                .ok_or("1 missing")?
                .member_count,
            Some(11)
        );

        // 4. A type change counts as an update.
        let mut fourth = third.clone();
        fourth[3].segment_type = "manual".into();
        assert_eq!(
            segments::apply_sync(c, ws, &fourth, ts(40)).await?,
            counts(0, 1, 0, 3)
        );

        // 5. Everything disappears; a second empty sync changes nothing.
        assert_eq!(
            segments::apply_sync(c, ws, &[], ts(50)).await?,
            counts(0, 0, 4, 0)
        );
        assert_eq!(
            segments::apply_sync(c, ws, &[], ts(60)).await?,
            counts(0, 0, 0, 0)
        );
        let rows = all(c, ws).await?;
        assert!(
            rows.iter()
                .all(|r| r.removed && r.removed_at == Some(ts(50)))
        );
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(apply_sync_edge_cases, |db: TestDatabase| async move {
    let c = &db.conn;
    let ws1 = workspace(&db, "site-1").await?;
    let ws2 = workspace(&db, "site-2").await?;

    // Duplicate ids in one listing: the last one wins, counted once.
    let dupes = vec![seg(7, "first", "dynamic"), seg(7, "second", "manual")];
    assert_eq!(
        segments::apply_sync(c, ws1, &dupes, ts(0)).await?,
        counts(1, 0, 0, 0)
    );
    let seven = segments::get(c, ws1, 7).await?.ok_or("7 missing")?;
    assert_eq!(
        (seven.name.as_str(), seven.segment_type.as_str()),
        ("second", "manual")
    );

    // Workspaces are independent: the same cio_id lives in both, and syncing one never
    // removes the other's rows.
    assert_eq!(
        segments::apply_sync(c, ws2, &[seg(7, "other", "dynamic")], ts(0)).await?,
        counts(1, 0, 0, 0)
    );
    assert_eq!(
        segments::apply_sync(c, ws2, &[], ts(1)).await?,
        counts(0, 0, 1, 0)
    );
    assert!(!segments::get(c, ws1, 7).await?.ok_or("7 missing")?.removed);

    // Sub-microsecond precision is dropped the same way on both backends.
    let precise: DateTime<Utc> = ts(100) + Duration::nanoseconds(123_456_789);
    let synced: DateTime<Utc> = ts(101) + Duration::nanoseconds(999_999_999);
    let listing = [
        seg(7, "second", "manual"),
        counted(8, "precise", 1, precise),
    ];
    assert_eq!(
        segments::apply_sync(c, ws1, &listing, synced).await?,
        counts(1, 0, 0, 1)
    );
    let eight = segments::get(c, ws1, 8).await?.ok_or("8 missing")?;
    assert_eq!(
        eight.counted_at,
        Some(ts(100) + Duration::microseconds(123_456))
    );
    assert_eq!(eight.synced_at, ts(101) + Duration::microseconds(999_999));
    // Same values again: unchanged (the truncated timestamps compare equal).
    assert_eq!(
        segments::apply_sync(c, ws1, &listing, synced).await?,
        counts(0, 0, 0, 2)
    );

    // Unknown workspace: an error, nothing written.
    let err = segments::apply_sync(c, 9_999, &[seg(1, "x", "dynamic")], ts(0)).await;
    assert!(matches!(err, Err(DbError::Db(_))), "{err:?}");
    // A type outside dynamic/manual is refused by the database, and the sync is rolled back.
    let bad = vec![seg(9, "fine", "dynamic"), seg(10, "bad", "smart")];
    assert!(segments::apply_sync(c, ws1, &bad, ts(200)).await.is_err());
    assert_eq!(segments::get(c, ws1, 9).await?, None);
    assert!(!segments::get(c, ws1, 7).await?.ok_or("7 missing")?.removed);

    // Larger listings go through in chunks.
    let many: Vec<SyncedSegment> = (1_000..2_200)
        .map(|i| seg(i, &format!("s{i}"), "dynamic"))
        .collect();
    assert_eq!(
        segments::apply_sync(c, ws2, &many, ts(300)).await?,
        counts(1_200, 0, 0, 0)
    );
    assert_eq!(
        segments::apply_sync(c, ws2, &many[..600], ts(301)).await?,
        counts(0, 0, 600, 600)
    );
    TestResult::Ok(())
});

/// Names chosen so that an unescaped `%` / `_`, a case-sensitive match or an ASCII-only
/// lowercase would each return something different.
fn catalogue() -> Vec<SyncedSegment> {
    vec![
        seg(1, "Growth Investors", "dynamic"),
        seg(2, "growth_hackers", "manual"),
        seg(3, "Growth Hackers", "dynamic"),
        seg(4, "100% Crypto", "dynamic"),
        seg(5, "1000 Crypto", "manual"),
        seg(6, "ÉLAN Élite", "dynamic"),
        seg(7, r"back\slash", "manual"),
        seg(8, "Removed Growth", "dynamic"),
        seg(9, "10x GROWTH", "manual"),
    ]
}

async fn names(db: &DatabaseConnection, ws: i64, filter: &ListFilter) -> Result<Vec<i64>, DbError> {
    Ok(segments::list(db, ws, filter, None, 100)
        .await?
        .into_iter()
        .map(|r| r.cio_id)
        .collect())
}

fn containing(needle: &str) -> ListFilter {
    ListFilter {
        name_contains: Some(needle.to_owned()),
        ..ListFilter::default()
    }
}

sharpsend_db::db_test!(
    list_filters_behave_the_same_on_both_backends,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        segments::apply_sync(c, ws, &catalogue(), ts(0)).await?;
        let without_8: Vec<SyncedSegment> =
            catalogue().into_iter().filter(|s| s.cio_id != 8).collect();
        segments::apply_sync(c, ws, &without_8, ts(1)).await?;

        // Removed ones are hidden by default, shown on request.
        assert_eq!(
            names(c, ws, &ListFilter::default()).await?,
            [1, 2, 3, 4, 5, 6, 7, 9]
        );
        let with_removed = ListFilter {
            include_removed: true,
            ..ListFilter::default()
        };
        assert_eq!(
            names(c, ws, &with_removed).await?,
            [1, 2, 3, 4, 5, 6, 7, 8, 9]
        );

        // Case-insensitive substring.
        assert_eq!(names(c, ws, &containing("GROWTH")).await?, [1, 2, 3, 9]);
        assert_eq!(names(c, ws, &containing("growth")).await?, [1, 2, 3, 9]);
        let growth_all = ListFilter {
            include_removed: true,
            ..containing("Growth")
        };
        assert_eq!(names(c, ws, &growth_all).await?, [1, 2, 3, 8, 9]);
        // `_` and `%` are literal.
        assert_eq!(names(c, ws, &containing("_")).await?, [2]);
        assert_eq!(names(c, ws, &containing("h_h")).await?, [2]);
        assert_eq!(names(c, ws, &containing("%")).await?, [4]);
        assert_eq!(names(c, ws, &containing("0%")).await?, [4]);
        assert_eq!(names(c, ws, &containing("100")).await?, [4, 5]);
        assert_eq!(names(c, ws, &containing(r"k\s")).await?, [7]);
        assert_eq!(names(c, ws, &containing(r"\")).await?, [7]);
        // Unicode case folding, identical on SQLite (whose LOWER() is ASCII-only) and PostgreSQL.
        assert_eq!(names(c, ws, &containing("élan é")).await?, [6]);
        assert_eq!(names(c, ws, &containing("ÉLITE")).await?, [6]);
        // Empty needle: no filter.
        assert_eq!(names(c, ws, &containing("")).await?.len(), 8);
        assert!(names(c, ws, &containing("zzz")).await?.is_empty());

        // Type filter, alone and combined.
        let manual = ListFilter {
            segment_type: Some(TypeFilter::Manual),
            ..ListFilter::default()
        };
        assert_eq!(names(c, ws, &manual).await?, [2, 5, 7, 9]);
        let dynamic_growth = ListFilter {
            segment_type: Some(TypeFilter::Dynamic),
            ..containing("growth")
        };
        assert_eq!(names(c, ws, &dynamic_growth).await?, [1, 3]);
        assert_eq!(TypeFilter::Dynamic.as_str(), "dynamic");

        // Another workspace sees none of it.
        let other = workspace(&db, "site-2").await?;
        assert!(names(c, other, &with_removed).await?.is_empty());
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    keyset_paging_walks_every_row_once,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        // Ids out of order and with gaps; every third one manual.
        let listing: Vec<SyncedSegment> = (0..25)
            .rev()
            .map(|i| {
                seg(
                    i * 7 + 3,
                    &format!("Segment {i}"),
                    if i % 3 == 0 { "manual" } else { "dynamic" },
                )
            })
            .collect();
        segments::apply_sync(c, ws, &listing, ts(0)).await?;

        let mut expected: Vec<i64> = listing.iter().map(|s| s.cio_id).collect();
        expected.sort_unstable();

        let filter = ListFilter::default();
        let mut seen = Vec::new();
        let mut after = None;
        let mut pages = 0;
        loop {
            let page = segments::list(c, ws, &filter, after, 10).await?;
            if page.is_empty() {
                break;
            }
            pages += 1;
            assert!(page.len() <= 10);
            after = page.last().map(|r| r.cio_id);
            seen.extend(page.into_iter().map(|r| r.cio_id));
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, expected);

        // Paging combined with a filter.
        let manual = ListFilter {
            segment_type: Some(TypeFilter::Manual),
            ..ListFilter::default()
        };
        let page1 = segments::list(c, ws, &manual, None, 4).await?;
        let page2 = segments::list(c, ws, &manual, page1.last().map(|r| r.cio_id), 10).await?;
        assert_eq!((page1.len(), page2.len()), (4, 5));
        let got: Vec<i64> = page1.iter().chain(&page2).map(|r| r.cio_id).collect();
        let want: Vec<i64> = (0..25).filter(|i| i % 3 == 0).map(|i| i * 7 + 3).collect();
        assert_eq!(got, want);
        assert!(segments::list(c, ws, &filter, None, 0).await?.is_empty());
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    get_and_get_many_include_removed,
    |db: TestDatabase| async move {
        let c = &db.conn;
        let ws = workspace(&db, "site-1").await?;
        let other = workspace(&db, "site-2").await?;
        segments::apply_sync(
            c,
            ws,
            &[
                seg(1, "a", "dynamic"),
                seg(2, "b", "manual"),
                seg(3, "c", "dynamic"),
            ],
            ts(0),
        )
        .await?;
        segments::apply_sync(
            c,
            ws,
            &[seg(1, "a", "dynamic"), seg(3, "c", "dynamic")],
            ts(1),
        )
        .await?;
        segments::apply_sync(c, other, &[seg(4, "d", "dynamic")], ts(0)).await?;

        let two = segments::get(c, ws, 2).await?.ok_or("2 missing")?;
        assert!(two.removed);
        assert_eq!(segments::get(c, ws, 99).await?, None);
        assert_eq!(
            segments::get(c, ws, 4).await?,
            None,
            "belongs to another workspace"
        );

        let many = segments::get_many(c, ws, &[3, 99, 2, 4, 3]).await?;
        assert_eq!(many.iter().map(|r| r.cio_id).collect::<Vec<_>>(), [2, 3]);
        assert!(segments::get_many(c, ws, &[]).await?.is_empty());

        let ids: Vec<i64> = (1..=1_200).collect();
        assert_eq!(segments::get_many(c, ws, &ids).await?.len(), 3);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_syncs_of_one_workspace_serialise,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        let other = db.connect_again().await?;
        let listing = vec![
            seg(1, "a", "dynamic"),
            seg(2, "b", "manual"),
            seg(3, "c", "dynamic"),
        ];
        let mut tasks = Vec::new();
        for i in 0..6_i64 {
            let conn = if i % 2 == 0 {
                db.conn.clone()
            } else {
                other.clone()
            };
            let listing = listing.clone();
            tasks.push(tokio::spawn(async move {
                segments::apply_sync(&conn, ws, &listing, ts(i)).await
            }));
        }
        let mut total = SyncCounts::default();
        for t in tasks {
            let c = t.await??;
            total.created += c.created;
            total.updated += c.updated;
            total.removed += c.removed;
            total.unchanged += c.unchanged;
        }
        // Exactly one sync created the rows; the others found them.
        assert_eq!(total, counts(3, 0, 0, 15));
        assert_eq!(all(&db.conn, ws).await?.len(), 3);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    a_sync_written_in_parts_keeps_each_part_and_removes_only_at_the_end,
    |db: TestDatabase| async move {
        let ws = workspace(&db, "site-1").await?;
        segments::apply_sync(
            &db.conn,
            ws,
            &[seg(1, "Old", "manual"), seg(2, "Kept", "manual")],
            ts(0),
        )
        .await?;

        // Part one commits at once; nothing is marked removed by a part.
        let first = segments::apply_sync_batch(
            &db.conn,
            ws,
            &[seg(2, "Kept", "manual"), seg(3, "New", "manual")],
            ts(10),
        )
        .await?;
        assert_eq!(first, counts(1, 0, 0, 1));
        let after_part = all(&db.conn, ws).await?;
        assert_eq!(after_part.len(), 3);
        assert!(after_part.iter().all(|s| !s.removed));

        // The end of the listing marks what was not seen (1) as removed, once.
        let seen: std::collections::HashSet<i64> = [2, 3].into();
        assert_eq!(
            segments::mark_unseen_removed(&db.conn, ws, &seen, ts(20)).await?,
            1
        );
        assert_eq!(
            segments::mark_unseen_removed(&db.conn, ws, &seen, ts(30)).await?,
            0
        );
        let end = all(&db.conn, ws).await?;
        let removed: Vec<i64> = end.iter().filter(|s| s.removed).map(|s| s.cio_id).collect();
        assert_eq!(removed, [1]);
        TestResult::Ok(())
    }
);
