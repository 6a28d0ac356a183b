use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::{DbError, ensure_migrated, migrate, pending_migrations};

const ALL: [&str; 36] = [
    "m20261128_000001_create_workspaces",
    "m20261128_000002_create_segments",
    "m20261128_000003_create_job_runs",
    "m20261128_000004_create_job_leases",
    "m20261128_000005_create_profiles",
    "m20261128_000006_create_outbox",
    "m20261128_000007_create_managed_segments",
    "m20261128_000008_outbox_segment_kinds",
    "m20261128_000009_create_sends",
    "m20261128_000010_create_campaigns_and_metrics",
    "m20261206_000015_send_attempt_window",
    "m20261206_000016_send_subscription_topic",
    "m20261206_000017_send_trigger_errors",
    "m20261206_000018_create_idempotency_keys",
    "m20261206_000021_create_profile_sync_state",
    "m20261206_000026_create_delivery_events",
    "m20261206_000031_read_versions",
    "m20261206_000035_create_ab_tests",
    "m20261206_000040_ab_test_runs",
    "m20261206_000045_profile_changes",
    "m20261206_000050_delivery_events_analytics",
    "m20261206_000055_create_api_keys",
    "m20261206_000056_create_audit_events",
    "m20261206_000060_workspace_credentials",
    "m20261206_000061_workspace_version",
    "m20261206_000065_analytics_deliveries",
    "m20261206_000070_send_cancellation",
    "m20261207_000080_profile_numbers",
    "m20261207_000090_numbers_first_character",
    "m20261207_000091_profile_changes_once",
    "m20261207_000092_workspace_checks_per_statement",
    "m20261207_000093_segment_members_by_person",
    "m20261207_000094_profile_changes_by_segment",
    "m20261207_000095_read_versions_deliveries",
    "m20261207_000096_numbers_from_the_patch",
    "m20261208_000097_segment_members_workspace_per_statement",
];

sharpsend_db::db_test!(
    fresh_database_is_pending_until_migrated,
    unmigrated,
    |db: TestDatabase| async move {
        assert_eq!(pending_migrations(&db.conn).await?, ALL);
        // Checking is read-only: it does not create the bookkeeping table, so asking twice agrees.
        assert_eq!(pending_migrations(&db.conn).await?.len(), ALL.len());

        match ensure_migrated(&db.conn).await {
            Err(e @ DbError::PendingMigrations { count, .. }) if count == ALL.len() => {
                let msg = e.to_string();
                let expected = format!("{} pending database migration(s)", ALL.len());
                assert!(msg.contains(&expected), "{msg}");
                assert!(msg.contains(ALL[0]), "{msg}");
                assert!(msg.contains("sharpsend-server migrate"), "{msg}");
            }
            other => panic!("expected PendingMigrations, got {other:?}"),
        }

        migrate(&db.conn).await?;
        assert!(pending_migrations(&db.conn).await?.is_empty());
        ensure_migrated(&db.conn).await?;
        // Idempotent.
        migrate(&db.conn).await?;
        ensure_migrated(&db.conn).await?;
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_migrations_do_not_collide,
    unmigrated,
    |db: TestDatabase| async move {
        let other = db.connect_again().await?;
        let (a, b) = tokio::join!(migrate(&db.conn), migrate(&other));
        a?;
        b?;
        ensure_migrated(&db.conn).await?;
        ensure_migrated(&other).await?;
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    migrated_test_database_is_ready,
    |db: TestDatabase| async move {
        ensure_migrated(&db.conn).await?;
        // The URL works for a second pool (or another process).
        let other = sharpsend_db::connect(&db.url).await?;
        ensure_migrated(&other).await?;
        TestResult::Ok(())
    }
);

/// The SQLite pool gets WAL, foreign keys and a busy timeout on every connection.
#[tokio::test]
async fn sqlite_connections_are_configured() -> TestResult {
    use sea_orm::{ConnectionTrait, DbBackend, Statement};

    let Some(db) = TestDatabase::create(sharpsend_db::testing::Backend::Sqlite).await? else {
        return Err("SQLite is always available".into());
    };
    for (pragma, want) in [
        ("journal_mode", "wal"),
        ("foreign_keys", "1"),
        ("busy_timeout", "5000"),
    ] {
        let row = db
            .conn
            .query_one_raw(Statement::from_string(
                DbBackend::Sqlite,
                format!("PRAGMA {pragma}"),
            ))
            .await?
            .ok_or("no pragma row")?;
        let got = row
            .try_get_by_index::<String>(0)
            .or_else(|_| row.try_get_by_index::<i64>(0).map(|v| v.to_string()))?;
        assert_eq!(got, want, "PRAGMA {pragma}");
    }
    db.cleanup().await;

    // An in-memory database keeps its schema across queries (one shared connection).
    let mem = sharpsend_db::connect("sqlite::memory:").await?;
    migrate(&mem).await?;
    ensure_migrated(&mem).await?;
    sharpsend_db::workspaces::ensure(&mem, "site", "us").await?;
    assert_eq!(sharpsend_db::workspaces::list(&mem).await?.len(), 1);
    Ok(())
}
