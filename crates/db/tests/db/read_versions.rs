use sea_orm::{ConnectionTrait, DbBackend, TransactionTrait};
use sharpsend_db::read_versions::{Area, SqliteVersions, sqlite_versions};
use sharpsend_db::testing::{TestDatabase, TestResult};

sharpsend_db::db_test!(
    sqlite_reader_sees_every_committed_write_of_any_connection,
    |db: TestDatabase| async move {
        let reader = SqliteVersions::open(&db.conn)?;
        if db.conn.get_database_backend() == DbBackend::Postgres {
            assert!(
                reader.is_none(),
                "PostgreSQL signals changes by notification"
            );
            return TestResult::Ok(());
        }
        let reader = reader.expect("a SQLite file gets its own counter reader");
        let before = reader.read()?;
        assert_eq!(before, sqlite_versions(&db.conn).await?);

        // Two rows written by another connection: two bumps of `deliveries` only.
        let other = db.connect_again().await?;
        other
            .execute_unprepared(
                "INSERT INTO analytics_deliveries (workspace_id, delivery_id, send_id, segment_id, \
                 first_id, first_at, last_at, wh_open, wh_click, webhook, poll) VALUES \
                 (1, 'd1', 1, 0, 1, 0, 0, 0, 0, 1, 0), (1, 'd2', 1, 0, 2, 0, 0, 0, 0, 1, 0)",
            )
            .await?;
        let after = reader.read()?;
        for area in Area::ALL {
            let bumps = after[area.index()] - before[area.index()];
            let expected = if area == Area::Deliveries { 2 } else { 0 };
            assert_eq!(bumps, expected, "{area:?}");
        }
        assert_eq!(after, sqlite_versions(&db.conn).await?);

        // A write not yet committed is not seen.
        let txn = other.begin().await?;
        txn.execute_unprepared("DELETE FROM analytics_deliveries WHERE delivery_id = 'd1'")
            .await?;
        assert_eq!(reader.read()?, after);
        txn.commit().await?;
        assert_eq!(
            reader.read()?[Area::Deliveries.index()],
            after[Area::Deliveries.index()] + 1
        );

        // Reads from several threads at once take several reader connections; after a commit,
        // every one of them sees it (none is left inside an old read).
        let all_read = |expected: [i64; Area::COUNT]| {
            std::thread::scope(|s| {
                let threads: Vec<_> = (0..8)
                    .map(|_| s.spawn(|| (0..200).all(|_| reader.read().ok() == Some(expected))))
                    .collect();
                threads.into_iter().all(|t| t.join().unwrap_or(false))
            })
        };
        assert!(all_read(reader.read()?));
        other
            .execute_unprepared("DELETE FROM analytics_deliveries WHERE delivery_id = 'd2'")
            .await?;
        let latest = sqlite_versions(&db.conn).await?;
        assert!(all_read(latest), "every reader sees the latest commit");
        other.close().await?;
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    a_database_without_a_file_reads_its_counters_through_the_pool,
    |_db: TestDatabase| async move {
        let memory = sharpsend_db::connect("sqlite::memory:").await?;
        assert!(SqliteVersions::open(&memory)?.is_none());
        TestResult::Ok(())
    }
);
