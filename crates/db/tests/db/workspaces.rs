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

fn sealed(tag: &str, key_id: &str) -> workspaces::SealedCredentials {
    workspaces::SealedCredentials {
        track_api_key: format!("v1:{key_id}:track-{tag}"),
        app_api_key: format!("v1:{key_id}:app-{tag}"),
        webhook_signing_key: None,
        key_id: key_id.to_owned(),
    }
}

fn new_workspace(site: &str) -> workspaces::NewWorkspace {
    workspaces::NewWorkspace {
        cio_site_id: site.to_owned(),
        region: "eu".to_owned(),
        name: format!("Publisher {site}"),
        track_requests_per_sec: Some(50),
        app_requests_per_sec: None,
        track_base_url: Some("http://127.0.0.1:9/track".to_owned()),
        app_base_url: None,
    }
}

sharpsend_db::db_test!(
    create_binds_sealed_credentials_to_the_new_id_and_refuses_a_stored_site,
    |db: TestDatabase| async move {
        let now = chrono::Utc::now();
        let default = workspaces::ensure(&db.conn, "env-site", "us").await?;
        let record = workspaces::create(
            &db.conn,
            new_workspace("site-x"),
            |id| sealed(&id.to_string(), "k1"),
            now,
        )
        .await?
        .expect("created");
        let id = record.workspace.id;
        assert_ne!(id, default.id);
        assert_eq!(record.credentials, Some(sealed(&id.to_string(), "k1")));
        assert_eq!(record.track_requests_per_sec, Some(50));
        assert_eq!(record.app_requests_per_sec, None);
        assert_eq!(
            record.track_base_url.as_deref(),
            Some("http://127.0.0.1:9/track")
        );
        assert_eq!(record.workspace.region, "eu");
        assert!(!record.workspace.disabled());
        assert_eq!(
            workspaces::get_record(&db.conn, id).await?,
            Some(record.clone())
        );
        // The env default has no stored credentials.
        let env = workspaces::get_record(&db.conn, default.id)
            .await?
            .expect("default");
        assert_eq!(env.credentials, None);

        for site in ["site-x", "env-site"] {
            let again = workspaces::create(
                &db.conn,
                new_workspace(site),
                |_| panic!("nothing is sealed for a stored site id"),
                now,
            )
            .await?;
            assert_eq!(again, None, "{site}");
        }
        assert_eq!(workspaces::list(&db.conn).await?.len(), 2);
        TestResult::Ok(())
    }
);

sharpsend_db::db_test!(
    update_disable_list_and_guarded_reseal,
    |db: TestDatabase| async move {
        let t0 = chrono::Utc::now();
        let mut ids = Vec::new();
        for site in ["s1", "s2", "s3"] {
            let r = workspaces::create(&db.conn, new_workspace(site), |_| sealed(site, "old"), t0)
                .await?
                .expect("created");
            ids.push(r.workspace.id);
        }
        let t1 = t0 + chrono::TimeDelta::seconds(5);
        let created_version = workspaces::get_record(&db.conn, ids[0])
            .await?
            .expect("stored")
            .version;
        let updated = workspaces::update(
            &db.conn,
            ids[0],
            created_version,
            workspaces::WorkspaceChange {
                name: Some("renamed".into()),
                app_requests_per_sec: Some(Some(7)),
                track_base_url: Some(Some("http://proxy.test".into())),
                credentials: Some(sealed("s1b", "new")),
                ..Default::default()
            },
            t1,
        )
        .await?;
        let workspaces::WorkspaceUpdated::Updated(updated) = updated else {
            panic!("not updated: {updated:?}");
        };
        assert_eq!(updated.workspace.name, "renamed");
        assert_eq!(updated.app_requests_per_sec, Some(7));
        assert_eq!(updated.track_requests_per_sec, Some(50));
        assert_eq!(updated.track_base_url.as_deref(), Some("http://proxy.test"));
        assert_eq!(updated.credentials, Some(sealed("s1b", "new")));
        assert_eq!(updated.version, created_version + 1);
        assert!(updated.workspace.updated_at > updated.workspace.created_at);

        // A change made from the version before is refused and changes nothing.
        let stale = workspaces::update(
            &db.conn,
            ids[0],
            created_version,
            workspaces::WorkspaceChange {
                name: Some("lost".into()),
                ..Default::default()
            },
            t1,
        )
        .await?;
        assert_eq!(stale, workspaces::WorkspaceUpdated::Conflict);
        // Overrides go back to their defaults when cleared.
        let cleared = workspaces::update(
            &db.conn,
            ids[0],
            updated.version,
            workspaces::WorkspaceChange {
                app_requests_per_sec: Some(None),
                track_base_url: Some(None),
                ..Default::default()
            },
            t1,
        )
        .await?;
        let workspaces::WorkspaceUpdated::Updated(cleared) = cleared else {
            panic!("not updated: {cleared:?}");
        };
        assert_eq!(cleared.workspace.name, "renamed");
        assert_eq!(cleared.app_requests_per_sec, None);
        assert_eq!(cleared.track_base_url, None);
        assert_eq!(cleared.track_requests_per_sec, Some(50));
        assert_eq!(
            workspaces::update(&db.conn, 9_999, 1, Default::default(), t1).await?,
            workspaces::WorkspaceUpdated::NotFound
        );

        // Only rows under another key than the current one need re-sealing.
        let stale = workspaces::sealed_under_other_keys(&db.conn, "new", None, 10).await?;
        assert_eq!(
            stale.iter().map(|r| r.workspace.id).collect::<Vec<_>>(),
            vec![ids[1], ids[2]]
        );
        let page = workspaces::sealed_under_other_keys(&db.conn, "new", Some(ids[1]), 10).await?;
        assert_eq!(page.len(), 1);
        // Compare-and-set: a value changed meanwhile wins.
        assert!(
            !workspaces::replace_sealed(
                &db.conn,
                ids[1],
                &sealed("other", "old"),
                sealed("s2", "new")
            )
            .await?
        );
        assert!(
            workspaces::replace_sealed(&db.conn, ids[1], &sealed("s2", "old"), sealed("s2", "new"))
                .await?
        );
        assert!(
            !workspaces::replace_sealed(
                &db.conn,
                ids[1],
                &sealed("s2", "old"),
                sealed("s2", "new")
            )
            .await?
        );
        let stale = workspaces::sealed_under_other_keys(&db.conn, "new", None, 10).await?;
        assert_eq!(stale.len(), 1);

        let t2 = t1 + chrono::TimeDelta::seconds(5);
        let disabled = workspaces::disable(&db.conn, ids[2], t2)
            .await?
            .expect("found");
        assert!(disabled.workspace.disabled());
        let first = disabled.workspace.disabled_at;
        let again = workspaces::disable(&db.conn, ids[2], t2 + chrono::TimeDelta::seconds(9))
            .await?
            .expect("found");
        assert_eq!(
            again.workspace.disabled_at, first,
            "disabling twice keeps the first time"
        );
        assert_eq!(workspaces::disable(&db.conn, 9_999, t2).await?, None);

        let active = workspaces::list_records(&db.conn, None, 10, false).await?;
        assert_eq!(active.len(), 2);
        let all = workspaces::list_records(&db.conn, None, 2, true).await?;
        assert_eq!(all.len(), 2);
        let rest = workspaces::list_records(&db.conn, Some(all[1].workspace.id), 2, true).await?;
        assert_eq!(
            rest.iter().map(|r| r.workspace.id).collect::<Vec<_>>(),
            vec![ids[2]]
        );
        TestResult::Ok(())
    }
);
