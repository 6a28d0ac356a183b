use sharpsend_db::testing::{TestDatabase, TestResult};
use sharpsend_db::workspaces;

sharpsend_db::db_test!(
    ensure_is_idempotent_and_updates_region,
    |db: TestDatabase| async move {
        let a = workspaces::ensure(&db.conn, "site-a", "us").await?;
        assert_eq!(a.cio_site_id, "site-a");
        assert_eq!(a.region, "us");
        assert_eq!(a.name, "site-a");

        let again = workspaces::ensure(&db.conn, "site-a", "us").await?;
        assert_eq!(again, a);

        let moved = workspaces::ensure(&db.conn, "site-a", "eu").await?;
        assert_eq!(moved.id, a.id);
        assert_eq!(moved.region, "eu");
        assert_eq!(workspaces::get(&db.conn, a.id).await?, Some(moved.clone()));
        assert_eq!(
            workspaces::find_by_site_id(&db.conn, "site-a").await?,
            Some(moved)
        );

        let b = workspaces::ensure(&db.conn, "site-b", "us").await?;
        assert_ne!(b.id, a.id);
        assert_eq!(workspaces::list(&db.conn).await?.len(), 2);
        assert_eq!(workspaces::find_by_site_id(&db.conn, "nope").await?, None);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    concurrent_ensure_yields_one_workspace,
    |db: TestDatabase| async move {
        let other = db.connect_again().await?;
        let mut tasks = Vec::new();
        for i in 0..10 {
            let conn = if i % 2 == 0 {
                db.conn.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                workspaces::ensure(&conn, "racy-site", "us").await
            }));
        }
        let mut ids = Vec::new();
        for t in tasks {
            ids.push(t.await??.id);
        }
        ids.dedup();
        assert_eq!(ids.len(), 1, "{ids:?}");
        assert_eq!(workspaces::list(&db.conn).await?.len(), 1);
        TestResult::Ok(())
    }
);
