//! Typed shadow values (issue #18): the evaluator reads number conditions from
//! `profiles.numbers`, maintained on write; it must agree with the attributes themselves after
//! every path that writes profiles — the profile sync from Customer.io, `UpdateAttributes`
//! (mirror + outbox), `ImportProfiles` — for values written as numbers, numeric strings,
//! non-numeric text and removals.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::ensure;
use cio_sim::SimConfig;
use sea_orm::{ConnectionTrait, DbBackend, Statement};
use serde_json::{Map, Value, json};
use sharpsend_core::jobs::{self, Job, JobOutcome};
use sharpsend_core::profiles::{self as core_profiles, AttributeUpdate};
use sharpsend_db::criteria_sql::{self, Comparison, Filter};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::ImportProfilesRequest;
use sharpsend_tests::TestApp;

/// Thresholds each numeric attribute is compared with (`gt`), and the `in` list.
const THRESHOLDS: [f64; 7] = [-1e300, -1.0, 0.0, 20.0, 50.0, 80.0, 1e12];

/// The attribute names of the workspace's mirror.
async fn attribute_names(app: &TestApp) -> anyhow::Result<BTreeSet<String>> {
    let db = &app.ctx.db;
    let backend = db.get_database_backend();
    let sql = match backend {
        DbBackend::Postgres => {
            "SELECT DISTINCT jsonb_object_keys(attributes) AS k FROM profiles WHERE workspace_id = $1"
        }
        _ => {
            "SELECT DISTINCT j.key AS k FROM profiles p, json_each(p.attributes) j \
             WHERE p.workspace_id = ?"
        }
    };
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(
            backend,
            sql,
            [app.ctx.workspace_id().into()],
        ))
        .await?;
    let mut names = BTreeSet::new();
    for row in rows {
        names.insert(row.try_get::<String>("", "k")?);
    }
    Ok(names)
}

/// For every attribute and threshold: the evaluator (shadow) selects the same people as the
/// reference reading the attributes.
async fn shadow_agrees(app: &TestApp, extra: &[&str], when: &str) -> anyhow::Result<()> {
    let mut names = attribute_names(app).await?;
    names.extend(extra.iter().map(|s| (*s).to_owned()));
    let ws = app.ctx.workspace_id();
    for name in &names {
        let mut filters: Vec<Filter> = THRESHOLDS
            .iter()
            .map(|t| Filter::Number {
                attribute: name.clone(),
                op: Comparison::Gt,
                value: *t,
            })
            .collect();
        filters.push(Filter::NumberIn {
            attribute: name.clone(),
            values: vec![10.0, 75.0, 99.0],
        });
        for filter in filters {
            let shadow: Vec<String> =
                criteria_sql::matching_page(&app.ctx.db, ws, &filter, None, 100_000)
                    .await?
                    .into_iter()
                    .map(|p| p.customer_id)
                    .collect();
            let reference = criteria_sql::reference_matching_ids(&app.ctx.db, ws, &filter).await?;
            ensure!(
                shadow == reference,
                "{when}: {filter:?}: the shadow selects {shadow:?}, the attributes {reference:?}"
            );
        }
    }
    Ok(())
}

/// Who the evaluator finds with `score > 50`.
async fn high(app: &TestApp) -> anyhow::Result<BTreeSet<String>> {
    let filter = Filter::Number {
        attribute: "score".into(),
        op: Comparison::Gt,
        value: 50.0,
    };
    Ok(
        criteria_sql::matching_page(&app.ctx.db, app.ctx.workspace_id(), &filter, None, 100_000)
            .await?
            .into_iter()
            .map(|p| p.customer_id)
            .collect(),
    )
}

fn attrs(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

async fn sync(app: &TestApp) -> anyhow::Result<()> {
    match jobs::run_job(&app.ctx, Job::ProfileSync, "e2e-test").await? {
        JobOutcome::Succeeded { .. } => Ok(()),
        other => anyhow::bail!("profile-sync did not run: {other:?}"),
    }
}

db_test!(
    the_typed_shadow_follows_every_path_that_writes_profiles,
    |db: TestDatabase| async move {
        let sim = SimConfig {
            demo_people: 40,
            app_rate_limit_per_sec: 0,
            ..SimConfig::demo()
        };
        let app = TestApp::spawn_with(&db, sim, |s| s.app_requests_per_sec = 1000).await?;
        app.run_job(Job::SegmentSync).await?;
        // Profile sync from Customer.io: the backfill (every value a string there).
        sync(&app).await?;
        shadow_agrees(&app, &["score"], "after the backfill").await?;
        let audience: BTreeSet<String> = app
            .sim
            .sim
            .segments()
            .iter()
            .flat_map(|s| app.sim.sim.segment_members(s.id).unwrap_or_default())
            .collect();
        let people: Vec<String> = audience.into_iter().take(3).collect();
        ensure!(people.len() == 3, "{people:?}");
        let (a, b, c) = (&people[0], &people[1], &people[2]);
        let set = |ids: &[&String]| ids.iter().map(|s| (*s).clone()).collect::<BTreeSet<_>>();

        // Profile sync, incremental: a numeric string, text, and a number written in
        // Customer.io.
        app.advance(Duration::from_secs(2));
        for (who, value) in [(a, json!("75")), (b, json!("n/a")), (c, json!(" 1e2 "))] {
            ensure!(
                app.sim
                    .sim
                    .change_attributes(who, attrs(json!({"score": value})))
            );
        }
        sync(&app).await?;
        let found = high(&app).await?;
        ensure!(found == set(&[a, c]), "{found:?}");
        shadow_agrees(&app, &["score"], "after an incremental sync").await?;

        // UpdateAttributes: the mirror and the outbox in one transaction.
        app.advance(Duration::from_secs(2));
        core_profiles::update_attributes(
            &app.ctx,
            vec![
                AttributeUpdate {
                    customer_id: a.clone(),
                    attributes: attrs(json!({"score": 10})),
                },
                AttributeUpdate {
                    customer_id: b.clone(),
                    attributes: attrs(json!({"score": 99.5})),
                },
                AttributeUpdate {
                    customer_id: c.clone(),
                    attributes: attrs(json!({"score": null})),
                },
            ],
            None,
        )
        .await?;
        let found = high(&app).await?;
        ensure!(found == set(&[b]), "{found:?}");
        shadow_agrees(&app, &["score"], "after UpdateAttributes").await?;
        app.deliver_all("shadow", Duration::from_secs(30)).await?;

        // ImportProfiles: Customer.io's values read again on request.
        app.advance(Duration::from_secs(2));
        for (who, value) in [(a, json!("88")), (b, json!("-3")), (c, json!("007"))] {
            ensure!(
                app.sim
                    .sim
                    .change_attributes(who, attrs(json!({"score": value})))
            );
        }
        let mut client = app.profiles().await?;
        let mut stream = client
            .import_profiles(ImportProfilesRequest {
                customer_ids: people.clone(),
                segment_id: 0,
            })
            .await?
            .into_inner();
        while stream.message().await?.is_some() {}
        let found = high(&app).await?;
        ensure!(found == set(&[a]), "{found:?}");
        shadow_agrees(&app, &["score"], "after ImportProfiles").await?;
        app.stop().await
    }
);
