//! Customer.io → SharpSend profile sync end to end (`profile-sync`): backfills by export and by
//! paging equal to the simulator's audience, form fills reaching the mirror and a managed
//! segment's membership in Customer.io, SharpSend's undelivered writes surviving older
//! Customer.io values, the 30-day window, and interrupted runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, ensure};
use cio_sim::{Fault, SimApi, SimConfig};
use serde_json::{Map, Value, json};
use sharpsend_core::{
    AppContext,
    jobs::{self, Job, JobOutcome, LEASE_TTL},
    profile_sync::ProfileSyncConfig,
};
use sharpsend_db::{
    db_test,
    profiles::{self, Lookup},
    testing::TestDatabase,
};
use sharpsend_proto::v1::{CreateSegmentRequest, UpdateAttributesRequest};
use sharpsend_tests::TestApp;

/// A small demo audience with App API limits lifted.
async fn spawn(db: &TestDatabase, people: usize) -> anyhow::Result<TestApp> {
    let sim = SimConfig {
        demo_people: people,
        app_rate_limit_per_sec: 0,
        ..SimConfig::demo()
    };
    TestApp::spawn_with(db, sim, |s| s.app_requests_per_sec = 1000).await
}

/// The app's context with these profile-sync settings.
fn with_config(app: &TestApp, config: ProfileSyncConfig) -> AppContext {
    let mut settings = (*app.ctx.settings).clone();
    settings.profile_sync = config;
    AppContext {
        settings: Arc::new(settings),
        ..app.ctx.clone()
    }
}

/// Runs `profile-sync` once; its run details.
async fn run_sync(ctx: &AppContext) -> anyhow::Result<Value> {
    match jobs::run_job(ctx, Job::ProfileSync, "e2e-test").await? {
        JobOutcome::Succeeded { details, .. } => Ok(details),
        other => anyhow::bail!("profile-sync did not run: {other:?}"),
    }
}

/// Customer.io's text form of a value.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn as_text(attributes: &Map<String, Value>) -> BTreeMap<String, String> {
    attributes
        .iter()
        .map(|(k, v)| (k.clone(), text(v)))
        .collect()
}

/// People of every segment of the simulator (what a default backfill reads).
fn audience(app: &TestApp) -> BTreeSet<String> {
    app.sim
        .sim
        .segments()
        .iter()
        .flat_map(|s| app.sim.sim.segment_members(s.id).unwrap_or_default())
        .collect()
}

/// Every attribute name the simulator's people hold.
fn attribute_names(app: &TestApp, people: &BTreeSet<String>) -> Vec<String> {
    let names: BTreeSet<String> = people
        .iter()
        .filter_map(|id| app.sim.sim.person(id))
        .flat_map(|p| p.attributes.keys().cloned().collect::<Vec<_>>())
        .collect();
    names.into_iter().collect()
}

/// The mirror equals the simulator for `people`, attribute for attribute (as text), and holds
/// nobody else.
async fn ensure_mirror_equals_sim(app: &TestApp, people: &BTreeSet<String>) -> anyhow::Result<()> {
    let ws = app.ctx.workspace_id();
    for id in people {
        let person = app.sim.sim.person(id).context("sim person")?;
        let profile = profiles::get(&app.ctx.db, ws, Lookup::Id(id))
            .await?
            .with_context(|| format!("{id} not mirrored"))?;
        ensure!(
            as_text(&profile.attributes) == as_text(&person.attributes),
            "{id}: mirror {:?} != simulator {:?}",
            profile.attributes,
            person.attributes
        );
        ensure!(profile.email == person.email, "{id}: email");
        ensure!(profile.cio_id.as_deref() == Some(person.cio_id.as_str()));
    }
    use sea_orm::{EntityTrait, PaginatorTrait};
    let mirrored = sharpsend_db::entities::profiles::Entity::find()
        .count(&app.ctx.db)
        .await?;
    ensure!(
        mirrored == people.len() as u64,
        "{mirrored} profiles mirrored, {} in the audience",
        people.len()
    );
    Ok(())
}

/// Feed requests received so far (counted on arrival).
fn feed_reads(app: &TestApp) -> u64 {
    app.sim
        .sim
        .request_counts_by_route()
        .iter()
        .filter(|(route, _)| route.contains("/activities"))
        .map(|(_, n)| n)
        .sum()
}

fn requests_to(app: &TestApp, route: &str) -> usize {
    app.sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.path.contains(route))
        .count()
}

db_test!(
    backfill_by_export_equals_the_simulators_audience,
    |db: TestDatabase| async move {
        let app = spawn(&db, 400).await?;
        app.run_job(Job::SegmentSync).await?;
        let people = audience(&app);
        ensure!(people.len() > 100, "the demo segments hold people");
        let ctx = with_config(
            &app,
            ProfileSyncConfig {
                attributes: attribute_names(&app, &people),
                paging_max: 0,
                export_wait: Duration::ZERO,
                ..ProfileSyncConfig::default()
            },
        );
        // Customer.io is still building the export: the run leaves it to the next.
        let first = run_sync(&ctx).await?;
        ensure!(first["mode"] == "waiting-for-export", "{first}");
        app.advance(Duration::from_secs(3));
        let second = run_sync(&ctx).await?;
        ensure!(second["mode"] == "backfill-export", "{second}");
        ensure!(
            second["export_id"] == first["export_id"],
            "the same export is resumed"
        );
        ensure!(
            app.sim.sim.exports().len() == 1,
            "one export for the backfill"
        );
        ensure!(second["read"] == json!(people.len()), "{second}");
        ensure_mirror_equals_sim(&app, &people).await?;
        // A handful of App API requests for any number of people: the feed's top, the export,
        // two status reads (one per run), the download link.
        let total =
            first["requests"].as_u64().unwrap_or(0) + second["requests"].as_u64().unwrap_or(0);
        ensure!(total == 5, "{total} App API requests");
        ensure!(requests_to(&app, "/customers/attributes") == 0);
        // The file came from the signed link without credentials (the simulator refuses
        // credentials there); a second run follows the feed.
        ensure!(app.sim.sim.exports()[0].downloads == 1);
        let third = run_sync(&ctx).await?;
        ensure!(
            third["mode"] == "incremental" && third["changed"] == 0,
            "{third}"
        );
        app.stop().await
    }
);

db_test!(
    small_audiences_are_backfilled_by_paging,
    |db: TestDatabase| async move {
        let app = spawn(&db, 150).await?;
        app.run_job(Job::SegmentSync).await?;
        let people = audience(&app);
        let ctx = with_config(&app, ProfileSyncConfig::default());
        let report = run_sync(&ctx).await?;
        ensure!(report["mode"] == "backfill-paging", "{report}");
        ensure!(app.sim.sim.exports().is_empty());
        ensure_mirror_equals_sim(&app, &people).await?;
        app.stop().await
    }
);

fn attrs(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap_or_default()
}

/// A backfilled app (paging path) and the id of one person of the audience.
async fn synced(db: &TestDatabase) -> anyhow::Result<(TestApp, AppContext, String)> {
    let app = spawn(db, 150).await?;
    app.run_job(Job::SegmentSync).await?;
    let ctx = with_config(&app, ProfileSyncConfig::default());
    run_sync(&ctx).await?;
    let person = audience(&app).into_iter().next().context("someone")?;
    Ok((app, ctx, person))
}

async fn mirrored(app: &TestApp, id: &str) -> anyhow::Result<Map<String, Value>> {
    Ok(
        profiles::get(&app.ctx.db, app.ctx.workspace_id(), Lookup::Id(id))
            .await?
            .context("mirrored")?
            .attributes,
    )
}

db_test!(
    a_form_fill_reaches_the_mirror_and_moves_a_managed_segment,
    |db: TestDatabase| async move {
        let (app, ctx, person) = synced(&db).await?;
        let mut segments = app.segments().await?;
        let created = segments
            .create_segment(CreateSegmentRequest {
                name: "Spring cohort".into(),
                description: String::new(),
                criteria: None,
                criteria_json:
                    r#"{"attribute": {"field": "cohort", "operator": "eq", "value": "spring"}}"#
                        .into(),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        app.deliver_all("w", Duration::from_secs(30)).await?;
        let members = || app.sim.sim.segment_members(created.id).unwrap_or_default();
        ensure!(members().is_empty());

        // A form fill in Customer.io: cohort set, plan removed.
        app.advance(Duration::from_secs(2));
        ensure!(
            app.sim
                .sim
                .change_attributes(&person, attrs(json!({"cohort": "spring", "plan": ""})))
        );
        let report = run_sync(&ctx).await?;
        ensure!(
            report["mode"] == "incremental" && report["changed"] == 1,
            "{report}"
        );
        ensure!(
            report["segments_marked"] == 1,
            "the segment reading `cohort` is due: {report}"
        );
        let now = mirrored(&app, &person).await?;
        ensure!(now.get("cohort") == Some(&json!("spring")), "{now:?}");
        ensure!(!now.contains_key("plan"), "a removed attribute is removed");

        // The evaluation puts the person into the segment in Customer.io.
        app.run_job(Job::SegmentEvaluation).await?;
        app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(members() == vec![person.clone()], "{:?}", members());

        // And takes them out when Customer.io's value changes again.
        app.advance(Duration::from_secs(2));
        ensure!(
            app.sim
                .sim
                .change_attributes(&person, attrs(json!({"cohort": "autumn"})))
        );
        run_sync(&ctx).await?;
        app.run_job(Job::SegmentEvaluation).await?;
        app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(members().is_empty(), "{:?}", members());
        app.stop().await
    }
);

db_test!(
    a_pending_sharpsend_write_survives_an_older_customer_io_value,
    |db: TestDatabase| async move {
        let (app, ctx, person) = synced(&db).await?;
        // Customer.io changes `tier` and `color`, shown 5 s ago (the simulator's clock ages
        // what happened; the service's clock is not moved, so its writes are "now").
        ensure!(
            app.sim
                .sim
                .change_attributes(&person, attrs(json!({"tier": "free", "color": "red"})))
        );
        app.sim.sim.advance(Duration::from_secs(5));
        // Then SharpSend writes `tier`, not yet delivered.
        let mut profiles_api = app.profiles().await?;
        profiles_api
            .update_attributes(UpdateAttributesRequest {
                customer_id: person.clone(),
                attributes: Some(sharpsend_server::convert::json_to_struct(&attrs(
                    json!({"tier": "pro"}),
                ))),
            })
            .await?;
        let report = run_sync(&ctx).await?;
        ensure!(report["kept_pending"] == 1, "{report}");
        let now = mirrored(&app, &person).await?;
        ensure!(
            now.get("tier") == Some(&json!("pro")),
            "the newer pending write wins: {now:?}"
        );
        ensure!(
            now.get("color") == Some(&json!("red")),
            "the rest applies: {now:?}"
        );

        // A Customer.io change newer than an undelivered write (accepted 10 s ago) wins.
        let ws = app.ctx.workspace_id();
        sharpsend_db::outbox::accept_attribute_updates(
            &app.ctx.db,
            ws,
            &[sharpsend_db::outbox::NewAttributeUpdate {
                customer_id: person.clone(),
                attributes: attrs(json!({"size": "L"})),
            }],
            app.ctx.now() - chrono::TimeDelta::seconds(10),
        )
        .await?;
        ensure!(
            app.sim
                .sim
                .change_attributes(&person, attrs(json!({"size": "XL"})))
        );
        let newer = run_sync(&ctx).await?;
        let now = mirrored(&app, &person).await?;
        ensure!(now.get("size") == Some(&json!("XL")), "{newer} {now:?}");

        // Once delivered, SharpSend's writes are Customer.io's newest changes and come back:
        // the mirror ends equal to Customer.io.
        app.deliver_all("w", Duration::from_secs(30)).await?;
        run_sync(&ctx).await?;
        let now = mirrored(&app, &person).await?;
        ensure!(
            now.get("tier") == Some(&json!("pro")) && now.get("size") == Some(&json!("L")),
            "{now:?}"
        );
        let sim = app.sim.sim.person(&person).context("sim person")?;
        ensure!(
            as_text(&now) == as_text(&sim.attributes),
            "{now:?} vs {:?}",
            sim.attributes
        );
        app.stop().await
    }
);

db_test!(
    a_cursor_older_than_the_feed_window_falls_back_to_a_backfill,
    |db: TestDatabase| async move {
        let (app, ctx, person) = synced(&db).await?;
        let incremental = run_sync(&ctx).await?;
        ensure!(incremental["mode"] == "incremental", "{incremental}");
        app.advance(Duration::from_secs(31 * 86_400));
        ensure!(
            app.sim
                .sim
                .change_attributes(&person, attrs(json!({"plan": "lifetime"})))
        );
        let report = run_sync(&ctx).await?;
        ensure!(report["mode"] == "backfill-paging", "{report}");
        ensure!(
            report["reason"]
                .as_str()
                .is_some_and(|r| r.contains("30-day")),
            "{report}"
        );
        ensure!(mirrored(&app, &person).await?.get("plan") == Some(&json!("lifetime")));
        ensure_mirror_equals_sim(&app, &audience(&app)).await?;
        ensure!(run_sync(&ctx).await?["mode"] == "incremental");
        app.stop().await
    }
);

db_test!(
    interrupted_runs_lose_nothing_and_apply_in_order,
    |db: TestDatabase| async move {
        let (app, ctx, person) = synced(&db).await?;
        // 250 changes of one attribute: three feed pages, newest first.
        for i in 1..=250 {
            ensure!(
                app.sim
                    .sim
                    .change_attributes(&person, attrs(json!({"counter": i})))
            );
        }
        // 1. The run fails on its second feed page: nothing of the first page is applied.
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [
                Fault::Delay(Duration::ZERO),
                Fault::Status {
                    status: 400,
                    retry_after_secs: None,
                },
            ],
        );
        let before = feed_reads(&app);
        let failed = jobs::run_job(&ctx, Job::ProfileSync, "e2e-test").await;
        ensure!(failed.is_err(), "the faulted run fails");
        ensure!(
            feed_reads(&app) == before + 2,
            "it failed on its second page"
        );
        ensure!(!mirrored(&app, &person).await?.contains_key("counter"));

        // 2. A run killed while reading its second page (its task dropped, as kill -9 would
        // leave it: lease held, transaction never committed).
        app.sim.sim.push_faults(
            Some(SimApi::App),
            [
                Fault::Delay(Duration::ZERO),
                Fault::Delay(Duration::from_secs(30)),
            ],
        );
        let before = feed_reads(&app);
        let task = tokio::spawn({
            let ctx = ctx.clone();
            async move { jobs::run_job(&ctx, Job::ProfileSync, "killed").await }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while feed_reads(&app) < before + 2 {
            ensure!(
                std::time::Instant::now() < deadline,
                "the run never read its second page"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        task.abort();
        ensure!(
            task.await.is_err_and(|e| e.is_cancelled()),
            "the run was killed mid-way"
        );
        ensure!(!mirrored(&app, &person).await?.contains_key("counter"));
        // The dead run's lease lapses; meanwhile Customer.io changed more.
        ensure!(
            app.sim
                .sim
                .change_attributes(&person, attrs(json!({"counter": 251, "late": "yes"})))
        );
        app.advance(LEASE_TTL + Duration::from_secs(1));
        let report = run_sync(&ctx).await?;
        ensure!(
            report["mode"] == "incremental" && report["read"] == 252,
            "{report}"
        );
        let now = mirrored(&app, &person).await?;
        ensure!(
            now.get("counter") == Some(&json!("251")),
            "the newest value, applied last: {now:?}"
        );
        ensure!(now.get("late") == Some(&json!("yes")));
        // Nothing is applied twice: the next run finds nothing new.
        let again = run_sync(&ctx).await?;
        ensure!(again["read"] == 0 && again["changed"] == 0, "{again}");
        app.stop().await
    }
);

/// An export row of `id` with `plan`.
fn export_row(columns: &Arc<[String]>, id: &str, plan: &str) -> cio_client::ExportRow {
    cio_client::ExportRow::new(
        columns.clone(),
        vec![id.to_owned(), format!("{id}@example.com"), plan.to_owned()],
    )
}

db_test!(
    a_large_export_loads_in_lanes_and_a_persons_last_row_wins,
    |db: TestDatabase| async move {
        use futures::stream;
        use sharpsend_core::profile_sync::load_export_rows;
        let app = spawn(&db, 0).await?;
        let ws = app.ctx.workspace_id();
        let columns: Arc<[String]> = ["id", "email", "plan"].map(String::from).into();
        // 4,000 people (several chunks per lane), then the first 1,000 again with a newer
        // plan: each must end with its last row, whichever lane and chunk carried it.
        let rows = (0..5_000).map(|i| {
            let (person, plan) = if i < 4_000 {
                (i, "free")
            } else {
                (i - 4_000, "pro")
            };
            Ok(export_row(&columns, &format!("reader-{person}"), plan))
        });
        let loaded = load_export_rows(
            &app.ctx,
            stream::iter(rows.collect::<Vec<_>>()),
            app.ctx.now(),
        )
        .await?;
        ensure!(loaded.counts.read == 5_000, "{:?}", loaded.counts);
        ensure!(loaded.counts.created == 4_000, "{:?}", loaded.counts);
        ensure!(loaded.skipped == 0);
        for (person, plan) in [(0, "pro"), (999, "pro"), (1_000, "free"), (3_999, "free")] {
            let id = format!("reader-{person}");
            let profile = profiles::get(&app.ctx.db, ws, Lookup::Id(&id))
                .await?
                .with_context(|| format!("{id} not mirrored"))?;
            ensure!(
                profile.attributes.get("plan") == Some(&json!(plan)),
                "{id}: {:?}",
                profile.attributes
            );
            ensure!(profile.email.as_deref() == Some(format!("{id}@example.com").as_str()));
        }

        // A download that breaks half-way: the error is reported (no hang), naming no link.
        let broken = (0..3_000).map(|i| {
            if i == 2_500 {
                Err(cio_client::DownloadError::Status { status: 502 })
            } else {
                Ok(export_row(&columns, &format!("late-{i}"), "premium"))
            }
        });
        let err = load_export_rows(
            &app.ctx,
            stream::iter(broken.collect::<Vec<_>>()),
            app.ctx.now(),
        )
        .await
        .err()
        .context("a broken download must fail the load")?;
        ensure!(
            err.to_string().contains("reading the export file failed"),
            "{err}"
        );
        app.stop().await
    }
);
