//! The real `sharpsend-scheduler` binary against the simulator and a test database.

// Tests read the environment and the time directly; the product code may not.
#![allow(clippy::disallowed_methods)]

use std::process::Output;

use anyhow::ensure;
use cio_sim::{Fault, SimApi, SimConfig, Simulator};
use sharpsend_db::{db_test, testing::TestDatabase};
use tokio::process::Command;

fn scheduler(database_url: &str, sim_url: &str, sim: &SimConfig) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_sharpsend-scheduler"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("DATABASE_URL", database_url)
        .env("CIO_SITE_ID", &sim.site_id)
        .env("CIO_TRACK_API_KEY", &sim.track_api_key)
        .env("CIO_APP_API_KEY", &sim.app_api_key)
        .env("CIO_TRACK_BASE_URL", sim_url)
        .env("CIO_APP_BASE_URL", sim_url)
        .env("RUST_LOG", "warn");
    command
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

db_test!(
    once_refuses_pending_migrations_then_runs_and_fails_loudly,
    unmigrated,
    |db: TestDatabase| async move {
        let sim = Simulator::spawn(SimConfig::demo()).await?;
        let config = sim.sim.config().clone();
        let once = || {
            let mut c = scheduler(&db.url, &sim.base_url(), &config);
            c.args(["--once", "segment-sync"]);
            c
        };

        let refused = once().output().await?;
        ensure!(
            !refused.status.success(),
            "started with pending migrations: {}",
            text(&refused)
        );
        ensure!(
            text(&refused).contains("sharpsend-server migrate"),
            "{}",
            text(&refused)
        );

        sharpsend_db::migrate(&db.conn).await?;
        let ran = once().output().await?;
        ensure!(ran.status.success(), "{}", text(&ran));
        ensure!(
            text(&ran).contains("segment-sync: succeeded"),
            "{}",
            text(&ran)
        );
        let ws = sharpsend_db::workspaces::ensure(&db.conn, &config.site_id, "us").await?;
        let mirrored =
            sharpsend_db::segments::list(&db.conn, ws.id, &Default::default(), None, 1000).await?;
        ensure!(mirrored.len() == sim.sim.segments().len());

        sim.sim.push_faults(
            Some(SimApi::App),
            (0..20).map(|_| Fault::Status {
                status: 500,
                retry_after_secs: None,
            }),
        );
        let failed = once().output().await?;
        ensure!(
            !failed.status.success(),
            "a failed job exited 0: {}",
            text(&failed)
        );
        ensure!(text(&failed).contains("500"), "{}", text(&failed));
        let runs =
            sharpsend_db::jobs::recent_runs(&db.conn, ws.id, Some("segment-sync"), 10).await?;
        ensure!(runs.len() == 2 && runs[0].outcome == sharpsend_db::jobs::RunOutcome::Failed);
        sim.shutdown().await;
        Ok::<(), anyhow::Error>(())
    }
);

#[tokio::test]
async fn list_shows_jobs_and_bad_settings_name_their_variable() -> anyhow::Result<()> {
    let config = SimConfig::demo();
    let listed = scheduler("sqlite::memory:", "http://127.0.0.1:9", &config)
        .arg("--list")
        .output()
        .await?;
    ensure!(listed.status.success(), "{}", text(&listed));
    ensure!(
        text(&listed).contains("segment-sync") && text(&listed).contains("0 */5 * * * *"),
        "{}",
        text(&listed)
    );

    let bad_cron = scheduler("sqlite::memory:", "http://127.0.0.1:9", &config)
        .env("SHARPSEND_SEGMENT_SYNC_CRON", "every minute")
        .arg("--list")
        .output()
        .await?;
    ensure!(
        !bad_cron.status.success() && text(&bad_cron).contains("SHARPSEND_SEGMENT_SYNC_CRON"),
        "{}",
        text(&bad_cron)
    );

    let no_site = scheduler("sqlite::memory:", "http://127.0.0.1:9", &config)
        .env_remove("CIO_SITE_ID")
        .args(["--once", "segment-sync"])
        .output()
        .await?;
    ensure!(
        !no_site.status.success() && text(&no_site).contains("CIO_SITE_ID"),
        "{}",
        text(&no_site)
    );

    let unknown = scheduler("sqlite::memory:", "http://127.0.0.1:9", &config)
        .args(["--once", "nope"])
        .output()
        .await?;
    ensure!(
        !unknown.status.success() && text(&unknown).contains("segment-sync"),
        "{}",
        text(&unknown)
    );
    Ok(())
}

db_test!(
    killed_mid_delivery_and_restarted_loses_nothing_and_sends_no_event_twice,
    |db: TestDatabase| async move {
        use std::time::Duration;

        use sharpsend_core::{
            AppContext,
            clock::Clock,
            context::Migrations,
            profiles::{self, EventInput},
            settings::{CioSettings, Settings},
        };

        let sim = Simulator::spawn(SimConfig::demo()).await?;
        let config = sim.sim.config().clone();
        let url = sim.base_url();
        let settings = CioSettings::for_simulator(
            url.parse()?,
            &config.site_id,
            &config.track_api_key,
            &config.app_api_key,
        );
        let settings = Settings {
            database_url: db.url.clone(),
            cio: Some(settings),
            ..Settings::default()
        };
        let ctx = AppContext::bootstrap(settings, Migrations::Apply, Clock::system()).await?;
        let events: Vec<EventInput> = (0..3000)
            .map(|i| EventInput {
                customer_id: format!("u{:05}", i % 5000 + 1),
                name: "sharpsend_assignment_approved".into(),
                data: serde_json::Map::new(),
                timestamp: None,
                idempotency_key: Some(format!("kill-{i}")),
            })
            .collect();
        let mut accepted = Vec::new();
        for chunk in events.chunks(1000) {
            accepted.extend(profiles::track_events(&ctx, chunk.to_vec(), Some("events")).await?);
        }
        // Slow Customer.io down so delivery takes several seconds.
        sim.sim.set_chaos(
            Some(SimApi::Track),
            cio_sim::Chaos {
                latency: Duration::from_millis(250),
                ..Default::default()
            },
        );

        let start = || {
            let mut c = scheduler(&db.url, &url, &config);
            c.env("SHARPSEND_OUTBOX_CLAIM_LIMIT", "100")
                .env("SHARPSEND_OUTBOX_CONCURRENCY", "1")
                .env("SHARPSEND_OUTBOX_CLAIM_TTL_SECS", "2")
                .env("SHARPSEND_OUTBOX_POLL_MS", "100")
                .kill_on_drop(true);
            c.spawn()
        };
        let stats = || sharpsend_db::outbox::stats(&ctx.db, ctx.workspace_id());

        let mut first = start()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while stats().await?.delivered < 500 {
            ensure!(
                std::time::Instant::now() < deadline,
                "first scheduler delivered too little"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        first.kill().await?; // SIGKILL: no chance to finish the step in progress
        let at_kill = stats().await?;
        ensure!(
            at_kill.delivered < 3000,
            "everything was delivered before the kill: {at_kill:?}"
        );

        let mut second = start()?;
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        loop {
            let s = stats().await?;
            if s.delivered == 3000 {
                break;
            }
            ensure!(s.dead == 0, "{s:?}");
            ensure!(
                std::time::Instant::now() < deadline,
                "not all delivered after the restart: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        second.kill().await?;
        // Every accepted event reached Customer.io, each exactly once.
        let received = sim.sim.events();
        ensure!(
            received.len() == 3000,
            "{} events in Customer.io",
            received.len()
        );
        let ids: std::collections::HashSet<_> =
            received.iter().filter_map(|e| e.id.clone()).collect();
        ensure!(accepted.iter().all(|a| ids.contains(&a.event_id)));
        sim.shutdown().await;
        Ok::<(), anyhow::Error>(())
    }
);

db_test!(
    every_job_is_listed_and_runs_once,
    |db: TestDatabase| async move {
        use sharpsend_core::jobs::Job;

        let sim = Simulator::spawn(SimConfig::demo()).await?;
        let config = sim.sim.config().clone();
        let listed = scheduler(&db.url, &sim.base_url(), &config)
            .env("SHARPSEND_OUTBOX_DELIVERY_CRON", "*/7 * * * * *")
            .arg("--list")
            .output()
            .await?;
        ensure!(listed.status.success(), "{}", text(&listed));
        for job in Job::ALL {
            let line = text(&listed)
                .lines()
                .find(|l| l.split_whitespace().next() == Some(job.name()))
                .map(str::to_string)
                .unwrap_or_default();
            ensure!(
                line.contains(job.schedule_variable()) && line.contains(job.description()),
                "{job}: {}",
                text(&listed)
            );
            let schedule = if *job == Job::OutboxDelivery {
                "*/7 * * * * *"
            } else {
                sharpsend_core::settings::declared_default(job.schedule_variable())
                    .unwrap_or_default()
            };
            ensure!(line.contains(schedule), "{job}: {line}");
        }

        for job in Job::ALL {
            let ran = scheduler(&db.url, &sim.base_url(), &config)
                .args(["--once", job.name()])
                .output()
                .await?;
            ensure!(ran.status.success(), "{job}: {}", text(&ran));
            ensure!(
                text(&ran).contains(&format!("{job}: succeeded")),
                "{job}: {}",
                text(&ran)
            );
        }
        let ws = sharpsend_db::workspaces::ensure(&db.conn, &config.site_id, "us").await?;
        let runs = sharpsend_db::jobs::recent_runs(&db.conn, ws.id, None, 50).await?;
        ensure!(runs.len() == Job::ALL.len(), "{runs:?}");
        ensure!(
            runs.iter()
                .all(|r| r.outcome == sharpsend_db::jobs::RunOutcome::Succeeded
                    && r.holder.starts_with("scheduler@"))
        );
        sim.shutdown().await;
        Ok::<(), anyhow::Error>(())
    }
);

db_test!(
    wrong_credentials_or_region_stop_start_up_naming_the_variable,
    |db: TestDatabase| async move {
        // The workspace is in the EU; the scheduler is configured for the US (the default).
        let sim = Simulator::spawn(SimConfig {
            region: "eu".into(),
            ..SimConfig::demo()
        })
        .await?;
        let config = sim.sim.config().clone();
        let wrong_region = scheduler(&db.url, &sim.base_url(), &config)
            .args(["--once", "segment-sync"])
            .output()
            .await?;
        ensure!(!wrong_region.status.success(), "{}", text(&wrong_region));
        ensure!(
            text(&wrong_region).contains("CIO_REGION"),
            "{}",
            text(&wrong_region)
        );

        let wrong_key = scheduler(&db.url, &sim.base_url(), &config)
            .env("CIO_REGION", "eu")
            .env("CIO_TRACK_API_KEY", "not-the-key-7d1e")
            .args(["--once", "segment-sync"])
            .output()
            .await?;
        ensure!(!wrong_key.status.success(), "{}", text(&wrong_key));
        let shown = text(&wrong_key);
        ensure!(shown.contains("CIO_TRACK_API_KEY"), "{shown}");
        ensure!(
            !shown.contains("not-the-key-7d1e"),
            "the key was echoed: {shown}"
        );

        let right = scheduler(&db.url, &sim.base_url(), &config)
            .env("CIO_REGION", "eu")
            .args(["--once", "segment-sync"])
            .output()
            .await?;
        ensure!(right.status.success(), "{}", text(&right));
        sim.shutdown().await;
        Ok(())
    }
);

/// Makes a lease a killed process left behind lapse now, instead of waiting its 120 s out.
async fn expire_lease(db: &TestDatabase, job: &str) -> anyhow::Result<()> {
    use sea_orm::{ActiveModelTrait as _, ActiveValue::Set, ColumnTrait as _, EntityTrait as _};
    use sea_orm::{IntoActiveModel as _, QueryFilter as _};
    use sharpsend_db::entities::job_leases;

    let lease = job_leases::Entity::find()
        .filter(job_leases::Column::Job.eq(job))
        .one(&db.conn)
        .await?
        .ok_or_else(|| anyhow::anyhow!("no lease of {job}"))?;
    let mut lease = lease.into_active_model();
    lease.expires_at = Set(chrono::Utc::now() - chrono::TimeDelta::seconds(1));
    lease.update(&db.conn).await?;
    Ok(())
}

async fn mirrored_profiles(db: &TestDatabase) -> anyhow::Result<u64> {
    use sea_orm::{EntityTrait as _, PaginatorTrait as _};
    Ok(sharpsend_db::entities::profiles::Entity::find()
        .count(&db.conn)
        .await?)
}

db_test!(
    profile_sync_killed_mid_backfill_and_mid_feed_loses_nothing_and_applies_in_order,
    |db: TestDatabase| async move {
        use std::collections::{BTreeMap, BTreeSet};
        use std::time::{Duration, Instant};

        use serde_json::{Value, json};
        use sharpsend_db::profiles::{self, Lookup};

        const PEOPLE: usize = 20_000;
        let sim = Simulator::spawn(SimConfig {
            demo_people: PEOPLE,
            export_delay: Duration::from_secs(2),
            ..SimConfig::demo()
        })
        .await?;
        let config = sim.sim.config().clone();
        let url = sim.base_url();
        sharpsend_db::migrate(&db.conn).await?;
        let names: BTreeSet<String> = (1..=PEOPLE)
            .filter_map(|i| sim.sim.person(&format!("u{i:05}")))
            .flat_map(|p| p.attributes.keys().cloned().collect::<Vec<_>>())
            .filter(|name| name != "email")
            .collect();
        let names = names.into_iter().collect::<Vec<_>>().join(",");
        let sync = || {
            let mut c = scheduler(&db.url, &url, &config);
            // The export path, whatever the audience's size, asking for every attribute.
            c.env("SHARPSEND_PROFILE_SYNC_PAGING_MAX", "0")
                .env("SHARPSEND_PROFILE_SYNC_ATTRIBUTES", &names)
                .env("SHARPSEND_PROFILE_SYNC_EXPORT_WAIT_SECS", "60")
                .args(["--once", "profile-sync"])
                .kill_on_drop(true);
            c
        };
        let segments = scheduler(&db.url, &url, &config)
            .args(["--once", "segment-sync"])
            .output()
            .await?;
        ensure!(segments.status.success(), "{}", text(&segments));
        let audience: BTreeSet<String> = sim
            .sim
            .segments()
            .iter()
            .flat_map(|s| sim.sim.segment_members(s.id).unwrap_or_default())
            .collect();
        ensure!(audience.len() > 10_000, "{} people", audience.len());

        let ws = sharpsend_db::workspaces::ensure(&db.conn, &config.site_id, "us").await?;

        // 1. Killed while Customer.io prepares the export (once its id is recorded).
        let mut first = sync().spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while sharpsend_db::profile_sync::state(&db.conn, ws.id)
            .await?
            .backfill
            .is_none()
        {
            ensure!(Instant::now() < deadline, "no export was recorded");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.kill().await?;
        ensure!(mirrored_profiles(&db).await? == 0);
        expire_lease(&db, "profile-sync").await?;

        // 2. Killed half-way through loading the file.
        let mut second = sync().spawn()?;
        let deadline = Instant::now() + Duration::from_secs(60);
        let at_kill = loop {
            let n = mirrored_profiles(&db).await?;
            if n >= 2_000 {
                break n;
            }
            ensure!(Instant::now() < deadline, "the load never started ({n})");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        second.kill().await?;
        let after_kill = mirrored_profiles(&db).await?;
        ensure!(
            after_kill < audience.len() as u64,
            "the load finished before the kill ({at_kill} at the kill, {after_kill} after)"
        );
        expire_lease(&db, "profile-sync").await?;

        // 3. The next run takes up the same export and completes the mirror.
        let third = sync().output().await?;
        ensure!(third.status.success(), "{}", text(&third));
        ensure!(
            sim.sim.exports().len() == 1,
            "{} exports requested: the killed runs' export was not taken up",
            sim.sim.exports().len()
        );
        let as_text = |attributes: &serde_json::Map<String, Value>| -> BTreeMap<String, String> {
            attributes
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => (k.clone(), s.clone()),
                    other => (k.clone(), other.to_string()),
                })
                .collect()
        };
        for id in &audience {
            let person = sim.sim.person(id).expect("sim person");
            let profile = profiles::get(&db.conn, ws.id, Lookup::Id(id))
                .await?
                .ok_or_else(|| anyhow::anyhow!("{id} not mirrored"))?;
            ensure!(
                as_text(&profile.attributes) == as_text(&person.attributes),
                "{id}: mirror {:?} != simulator {:?}",
                profile.attributes,
                person.attributes
            );
        }
        ensure!(mirrored_profiles(&db).await? == audience.len() as u64);

        // 4. Killed while reading the activity feed: 300 people changed three times each
        // (9 pages of 100), read slowly.
        let changed: Vec<&String> = audience.iter().take(300).collect();
        for round in 1..=3 {
            for id in &changed {
                let mut attrs = serde_json::Map::new();
                attrs.insert("sync_round".into(), json!(round));
                ensure!(sim.sim.change_attributes(id, attrs));
            }
        }
        let feed_reads = || -> u64 {
            sim.sim
                .request_counts_by_route()
                .iter()
                .filter(|(route, _)| route.contains("/activities"))
                .map(|(_, n)| *n)
                .sum()
        };
        sim.sim.set_chaos(
            Some(SimApi::App),
            cio_sim::Chaos {
                latency: Duration::from_millis(300),
                ..Default::default()
            },
        );
        let before = feed_reads();
        let mut fourth = sync().spawn()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while feed_reads() < before + 4 {
            ensure!(Instant::now() < deadline, "the feed was not read");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        fourth.kill().await?;
        sim.sim
            .set_chaos(Some(SimApi::App), cio_sim::Chaos::default());
        for id in &changed {
            let profile = profiles::get(&db.conn, ws.id, Lookup::Id(id)).await?;
            ensure!(
                profile.is_some_and(|p| !p.attributes.contains_key("sync_round")),
                "{id}: a change of the killed run was applied"
            );
        }
        expire_lease(&db, "profile-sync").await?;

        // 5. The next run applies every change, oldest first: the last value wins everywhere;
        // the one after finds nothing new.
        let fifth = sync().output().await?;
        ensure!(fifth.status.success(), "{}", text(&fifth));
        for id in &changed {
            let profile = profiles::get(&db.conn, ws.id, Lookup::Id(id))
                .await?
                .ok_or_else(|| anyhow::anyhow!("{id} not mirrored"))?;
            let round = profile.attributes.get("sync_round").cloned();
            ensure!(
                round == Some(json!("3")) || round == Some(json!(3)),
                "{id}: sync_round {round:?}, expected the last change (3)"
            );
        }
        let reads = feed_reads();
        let sixth = sync().output().await?;
        ensure!(sixth.status.success(), "{}", text(&sixth));
        ensure!(
            feed_reads() == reads + 1,
            "the run after read {} feed pages",
            feed_reads() - reads
        );
        sim.shutdown().await;
        Ok::<(), anyhow::Error>(())
    }
);
