//! ProfileService end to end: writes through gRPC → outbox → simulator, reads, imports, status.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::Duration,
};

use anyhow::{Context, ensure};
use chrono::Utc;
use cio_sim::{Chaos, Fault, SimApi};
use prost_types::{Struct, value::Kind};
use serde_json::{Map, Value, json};
use sharpsend_db::{db_test, outbox::NewAttributeUpdate, testing::TestDatabase};
use sharpsend_proto::v1::{
    BatchTrackEventsRequest, BatchUpdateAttributesRequest, CustomerRef, GetProfileRequest,
    GetSyncStatusRequest, ImportProfilesRequest, ProfileSource, RetryDeadLettersRequest,
    TrackEventRequest, UpdateAttributesRequest, customer_ref::Identifier,
};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

fn to_struct(value: Value) -> Struct {
    sharpsend_server::convert::json_to_struct(value.as_object().unwrap_or(&Map::new()))
}

/// Sends 10,000 updates (2,000 people × 5, overlapping attributes) and 2,000 events through gRPC,
/// delivers, and returns (expected attributes per person, accepted event ids).
async fn write_load(
    app: &TestApp,
) -> anyhow::Result<(BTreeMap<String, Map<String, Value>>, Vec<String>)> {
    let mut client = app.profiles().await?;
    let mut expected: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    let mut updates = Vec::new();
    for round in 0..5 {
        for p in 0..2000 {
            let id = format!("load-{p:05}");
            let attrs = json!({ "engagement_score": round * 10 + p % 7, "round": round, format!("seen_{round}"): true });
            let entry = expected.entry(id.clone()).or_default();
            for (k, v) in attrs.as_object().cloned().unwrap_or_default() {
                entry.insert(k, v);
            }
            updates.push(UpdateAttributesRequest {
                customer_id: id,
                attributes: Some(to_struct(attrs)),
            });
        }
    }
    for chunk in updates.chunks(1000) {
        let accepted = client
            .batch_update_attributes(BatchUpdateAttributesRequest {
                updates: chunk.to_vec(),
            })
            .await?
            .into_inner();
        ensure!(accepted.accepted == 1000);
    }
    let mut event_ids = Vec::new();
    for half in 0..2 {
        let events: Vec<TrackEventRequest> = (0..1000)
            .map(|i| TrackEventRequest {
                customer_id: format!("load-{:05}", (half * 1000 + i) % 2000),
                name: "sharpsend_assignment_opened".into(),
                data: Some(to_struct(json!({"assignment": i}))),
                timestamp: None,
                idempotency_key: format!("load-event-{half}-{i}"),
            })
            .collect();
        let accepted = client
            .batch_track_events(BatchTrackEventsRequest { events })
            .await?
            .into_inner();
        event_ids.extend(accepted.events.into_iter().map(|e| e.event_id));
    }
    Ok((expected, event_ids))
}

async fn assert_simulator_holds(
    app: &TestApp,
    expected: &BTreeMap<String, Map<String, Value>>,
    event_ids: &[String],
) -> anyhow::Result<()> {
    for (id, attrs) in expected {
        let person = app
            .sim
            .sim
            .person(id)
            .with_context(|| format!("{id} missing in Customer.io"))?;
        ensure!(
            &person.attributes == attrs,
            "{id}: {:?} != {attrs:?}",
            person.attributes
        );
    }
    let events = app.sim.sim.events();
    let mut seen = HashMap::new();
    for e in &events {
        *seen.entry(e.id.clone().unwrap_or_default()).or_insert(0) += 1;
    }
    ensure!(
        events.len() == event_ids.len(),
        "{} events in Customer.io, {} sent",
        events.len(),
        event_ids.len()
    );
    for id in event_ids {
        ensure!(
            seen.get(id) == Some(&1),
            "event {id} seen {:?} times",
            seen.get(id)
        );
    }
    Ok(())
}

db_test!(
    ten_thousand_updates_and_two_thousand_events_arrive_exactly_once,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (expected, event_ids) = write_load(&app).await?;
        ensure!(event_ids.iter().collect::<HashSet<_>>().len() == 2000);
        let report = app
            .deliver_all("worker-1", Duration::from_secs(120))
            .await?;
        ensure!(report.delivered == 12_000 && report.dead == 0, "{report:?}");
        // Coalescing and batching: far fewer requests than writes.
        ensure!(
            report.requests < 100,
            "{} requests for 12,000 writes",
            report.requests
        );
        assert_simulator_holds(&app, &expected, &event_ids).await?;
        let status = app
            .profiles()
            .await?
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        ensure!(
            status.pending == 0
                && status.dead == 0
                && status.delivered == 12_000
                && status.last_delivered_at.is_some(),
            "{status:?}"
        );
        app.stop().await
    }
);

db_test!(
    writes_arrive_exactly_once_through_5xx_429_bursts_and_latency,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (expected, event_ids) = write_load(&app).await?;
        app.sim.sim.set_chaos(
            Some(SimApi::Track),
            Chaos {
                error_rate: 0.2,
                error_status: 503,
                latency: Duration::from_millis(30),
                drop_rate: 0.0,
            },
        );
        app.sim.sim.push_faults(
            Some(SimApi::Track),
            (0..6).map(|_| Fault::Status {
                status: 429,
                retry_after_secs: Some(1),
            }),
        );
        // Smaller claims so many batches meet the faults.
        let ctx = app.ctx.clone();
        let mut config = ctx.settings.delivery.clone();
        config.claim_limit = 500;
        let started = std::time::Instant::now();
        loop {
            sharpsend_core::outbox::drain(&ctx, "chaos-worker", &config).await?;
            let stats = sharpsend_db::outbox::stats(&ctx.db, ctx.workspace_id()).await?;
            if stats.pending == 0 && stats.in_flight == 0 {
                ensure!(stats.dead == 0 && stats.delivered == 12_000, "{stats:?}");
                break;
            }
            ensure!(
                started.elapsed() < Duration::from_secs(180),
                "not delivered: {stats:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let failed = app
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.status == 503 || r.status == 429)
            .count();
        ensure!(failed > 0, "no fault was injected");
        assert_simulator_holds(&app, &expected, &event_ids).await?;
        app.stop().await
    }
);

db_test!(
    an_operation_customer_io_rejects_is_dead_lettered_alone_with_its_reason,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        // A row accepted under looser rules (or altered data): Customer.io refuses a 151-byte
        // attribute name. It goes straight into the outbox, as an older release might have put it.
        let bad_name = "n".repeat(151);
        let mut rows = vec![NewAttributeUpdate {
            customer_id: "bad-1".into(),
            attributes: json!({ bad_name: 1 })
                .as_object()
                .cloned()
                .unwrap_or_default(),
        }];
        for i in 0..20 {
            rows.push(NewAttributeUpdate {
                customer_id: format!("good-{i}"),
                attributes: json!({"plan": "pro"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        sharpsend_db::outbox::accept_attribute_updates(
            &app.ctx.db,
            app.ctx.workspace_id(),
            &rows,
            Utc::now(),
        )
        .await?;
        let report = app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(report.delivered == 20 && report.dead == 1, "{report:?}");
        ensure!(app.sim.sim.person("bad-1").is_none() && app.sim.sim.person("good-7").is_some());

        let mut client = app.profiles().await?;
        let status = client
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        ensure!(
            status.dead == 1 && status.dead_letters.len() == 1,
            "{status:?}"
        );
        let dead = &status.dead_letters[0];
        ensure!(
            dead.customer_id == "bad-1" && dead.error.contains("Customer.io rejected"),
            "{dead:?}"
        );

        // Re-queued, it fails again the same way (nothing is retried forever or lost).
        let requeued = client
            .retry_dead_letters(RetryDeadLettersRequest { ids: vec![dead.id] })
            .await?
            .into_inner();
        ensure!(requeued.requeued == 1);
        let again = app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(again.dead == 1 && again.delivered == 0, "{again:?}");
        let status = client
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        ensure!(status.dead == 1 && status.delivered == 20);
        app.stop().await
    }
);

db_test!(
    every_validation_rule_names_its_field_and_batches_are_all_or_nothing,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let update = |id: &str, attrs: Value| UpdateAttributesRequest {
            customer_id: id.into(),
            attributes: Some(to_struct(attrs)),
        };
        let cases: Vec<(UpdateAttributesRequest, &str)> = vec![
            (update("", json!({"a": 1})), "customer_id"),
            (update("nul\u{0}id", json!({"a": 1})), "customer_id"),
            (update(&"x".repeat(151), json!({"a": 1})), "customer_id"),
            (update("p", json!({})), "attributes"),
            (update("p", json!({ "n".repeat(151): 1 })), "attributes"),
            (
                update("p", json!({"bio": "x".repeat(1001)})),
                "attributes.bio",
            ),
            (update("p", json!({"id": "other"})), "attributes.id"),
            (update("p", json!({"_update": true})), "attributes._update"),
            (update("p", json!({"email": 42})), "attributes.email"),
            (
                update(
                    "p",
                    Value::Object((0..301).map(|i| (format!("a{i}"), json!(i))).collect()),
                ),
                "attributes",
            ),
        ];
        for (request, field) in cases {
            let status = client
                .update_attributes(request)
                .await
                .err()
                .context("accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument
                    && bad_request_fields(&status) == vec![field],
                "{field}: {status:?}"
            );
        }
        let event = |name: &str, data: Value| TrackEventRequest {
            customer_id: "p".into(),
            name: name.into(),
            data: Some(to_struct(data)),
            timestamp: None,
            idempotency_key: String::new(),
        };
        for (request, field) in [
            (event("", json!({})), "name"),
            (event("ok", json!({"note": "a\u{0}b"})), "data.note"),
            (event(&"e".repeat(101), json!({})), "name"),
            (event("big", json!({"blob": "x".repeat(100_001)})), "data"),
            (
                TrackEventRequest {
                    idempotency_key: "k".repeat(201),
                    ..event("ok", json!({}))
                },
                "idempotency_key",
            ),
        ] {
            let status = client
                .track_event(request)
                .await
                .err()
                .context("accepted")?;
            ensure!(
                status.code() == Code::InvalidArgument
                    && bad_request_fields(&status) == vec![field],
                "{field}: {status:?}"
            );
        }

        // One bad update in a batch: nothing of the batch is accepted.
        let mut batch: Vec<UpdateAttributesRequest> = (0..10)
            .map(|i| update(&format!("ok-{i}"), json!({"a": i})))
            .collect();
        batch.push(update("bad", json!({"cio_id": "x"})));
        let status = client
            .batch_update_attributes(BatchUpdateAttributesRequest { updates: batch })
            .await
            .err()
            .context("accepted")?;
        ensure!(
            bad_request_fields(&status) == vec!["updates[10].attributes.cio_id"],
            "{status:?}"
        );
        let oversized: Vec<UpdateAttributesRequest> = (0..1001)
            .map(|i| update(&format!("p{i}"), json!({"a": 1})))
            .collect();
        let status = client
            .batch_update_attributes(BatchUpdateAttributesRequest { updates: oversized })
            .await
            .err()
            .context("accepted")?;
        ensure!(bad_request_fields(&status) == vec!["updates"], "{status:?}");
        let status = client
            .batch_track_events(BatchTrackEventsRequest { events: vec![] })
            .await
            .err()
            .context("accepted")?;
        ensure!(bad_request_fields(&status) == vec!["events"], "{status:?}");
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(stats.pending == 0, "something was half-accepted: {stats:?}");
        let missing = client
            .get_profile(GetProfileRequest {
                customer: Some(CustomerRef {
                    identifier: Some(Identifier::Id("ok-1".into())),
                }),
                fresh: false,
                ..Default::default()
            })
            .await;
        ensure!(missing.err().map(|s| s.code()) == Some(Code::NotFound));
        app.stop().await
    }
);

db_test!(
    an_idempotency_key_gives_the_same_event_once,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let request = TrackEventRequest {
            customer_id: "u00001".into(),
            name: "sharpsend_assignment_approved".into(),
            data: Some(to_struct(json!({"assignment_id": "a-1"}))),
            timestamp: None,
            idempotency_key: "approve-a-1".into(),
        };
        let first = client.track_event(request.clone()).await?.into_inner();
        let second = client.track_event(request.clone()).await?.into_inner();
        ensure!(
            !first.duplicate && second.duplicate && first.event_id == second.event_id,
            "{first:?} {second:?}"
        );
        ensure!(ulid_like(&first.event_id), "{}", first.event_id);
        app.deliver_all("w", Duration::from_secs(30)).await?;
        let third = client.track_event(request).await?.into_inner();
        ensure!(third.duplicate && third.event_id == first.event_id);
        app.deliver_all("w", Duration::from_secs(30)).await?;
        let events = app.sim.sim.events_for("u00001");
        ensure!(
            events.len() == 1 && events[0].id.as_deref() == Some(first.event_id.as_str()),
            "{events:?}"
        );
        app.stop().await
    }
);

fn ulid_like(id: &str) -> bool {
    id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

db_test!(
    profiles_read_from_the_mirror_or_fresh_from_customer_io,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let by = |identifier: Identifier, fresh: bool| GetProfileRequest {
            customer: Some(CustomerRef {
                identifier: Some(identifier),
            }),
            fresh,
            ..Default::default()
        };

        // Fresh from Customer.io: attributes and segments, then in the mirror by each identifier.
        let demo = app.sim.sim.person("u00001").context("demo person")?;
        let fresh = client
            .get_profile(by(Identifier::Id("u00001".into()), true))
            .await?
            .into_inner()
            .profile
            .context("profile")?;
        ensure!(fresh.source == ProfileSource::CustomerIo as i32);
        ensure!(
            fresh.email == demo.email.clone().unwrap_or_default() && fresh.cio_id == demo.cio_id
        );
        let want_segments: HashSet<i64> = app
            .sim
            .sim
            .segments()
            .iter()
            .filter(|s| {
                app.sim
                    .sim
                    .segment_members(s.id)
                    .unwrap_or_default()
                    .contains(&"u00001".to_string())
            })
            .map(|s| s.id)
            .collect();
        ensure!(
            fresh.segments.iter().map(|s| s.id).collect::<HashSet<_>>() == want_segments,
            "{:?} vs {want_segments:?}",
            fresh.segments
        );
        for identifier in [
            Identifier::Id("u00001".into()),
            Identifier::Email(demo.email.clone().unwrap_or_default().to_uppercase()),
            Identifier::CioId(demo.cio_id.clone()),
        ] {
            let p = client
                .get_profile(by(identifier.clone(), false))
                .await?
                .into_inner()
                .profile
                .context("profile")?;
            ensure!(
                p.id == "u00001"
                    && p.source == ProfileSource::Mirror as i32
                    && p.fetched_at.is_some(),
                "{identifier:?}"
            );
        }

        // A SharpSend write shows in the mirror at once.
        client
            .update_attributes(UpdateAttributesRequest {
                customer_id: "u00001".into(),
                attributes: Some(to_struct(json!({"sharpsend_score": 91}))),
            })
            .await?;
        let p = client
            .get_profile(by(Identifier::Id("u00001".into()), false))
            .await?
            .into_inner()
            .profile
            .context("profile")?;
        let score = p
            .attributes
            .and_then(|a| a.fields.get("sharpsend_score").cloned())
            .and_then(|v| v.kind);
        ensure!(
            matches!(score, Some(Kind::NumberValue(n)) if n == 91.0),
            "{score:?}"
        );

        for (request, code) in [
            (by(Identifier::Id("nobody".into()), false), Code::NotFound),
            (by(Identifier::Id("nobody".into()), true), Code::NotFound),
            (
                GetProfileRequest {
                    customer: None,
                    fresh: false,
                    ..Default::default()
                },
                Code::InvalidArgument,
            ),
            (
                by(Identifier::Id(String::new()), false),
                Code::InvalidArgument,
            ),
        ] {
            let status = client.get_profile(request).await.err().context("found")?;
            ensure!(status.code() == code, "{status:?}");
        }
        app.stop().await
    }
);

db_test!(
    import_pulls_a_segment_into_the_mirror_with_progress,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let segment = app
            .sim
            .sim
            .segments()
            .into_iter()
            .find(|s| s.name == "High Net Worth")
            .context("segment")?;
        let mut stream = client
            .import_profiles(ImportProfilesRequest {
                customer_ids: vec![],
                segment_id: segment.id,
            })
            .await?
            .into_inner();
        let mut updates = Vec::new();
        while let Some(progress) = stream.message().await? {
            updates.push(progress);
        }
        let last = updates.last().context("no progress")?;
        ensure!(
            last.done
                && last.imported == segment.member_count
                && last.total == segment.member_count,
            "{last:?}"
        );
        ensure!(
            updates.len() >= 3 && updates.windows(2).all(|w| w[0].imported <= w[1].imported),
            "{} updates",
            updates.len()
        );
        let member = app
            .sim
            .sim
            .segment_members(segment.id)
            .unwrap_or_default()
            .into_iter()
            .next()
            .context("member")?;
        let p = client
            .get_profile(GetProfileRequest {
                customer: Some(CustomerRef {
                    identifier: Some(Identifier::Id(member.clone())),
                }),
                fresh: false,
                ..Default::default()
            })
            .await?
            .into_inner();
        ensure!(
            p.profile
                .and_then(|p| p.attributes)
                .is_some_and(|a| a.fields.contains_key("investor_type"))
        );
        // App API calls stayed within the rate limit: 100 people per attributes call.
        let calls = app
            .sim
            .sim
            .requests()
            .iter()
            .filter(|r| r.path == "/v1/customers/attributes")
            .count();
        ensure!(
            calls as u64 == segment.member_count.div_ceil(100),
            "{calls} calls"
        );

        let mut stream = client
            .import_profiles(ImportProfilesRequest {
                customer_ids: vec!["u00002".into(), "ghost".into()],
                segment_id: 0,
            })
            .await?
            .into_inner();
        let mut not_found = Vec::new();
        while let Some(p) = stream.message().await? {
            not_found.extend(p.not_found);
        }
        ensure!(not_found == vec!["ghost".to_string()], "{not_found:?}");
        let status = client
            .import_profiles(ImportProfilesRequest {
                customer_ids: vec![],
                segment_id: 0,
            })
            .await
            .err()
            .context("accepted")?;
        ensure!(status.code() == Code::InvalidArgument);
        app.stop().await
    }
);

db_test!(
    two_workers_at_once_never_deliver_a_row_twice,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (_, event_ids) = write_load(&app).await?;
        let mut small = app.ctx.settings.delivery.clone();
        small.claim_limit = 300;
        let a = app.ctx.clone();
        let b = sharpsend_core::AppContext::new(
            db.connect_again().await?,
            app.ctx.cio.clone(),
            (*app.ctx.workspace).clone(),
            app.ctx.settings.clone(),
            app.ctx.clock.clone(),
        );
        let (ra, rb) = tokio::join!(
            sharpsend_core::outbox::drain(&a, "worker-a", &small),
            sharpsend_core::outbox::drain(&b, "worker-b", &small)
        );
        let (ra, rb) = (ra?, rb?);
        let set_a: HashSet<i64> = ra.delivered_ids.iter().copied().collect();
        let set_b: HashSet<i64> = rb.delivered_ids.iter().copied().collect();
        ensure!(
            !set_a.is_empty() && !set_b.is_empty(),
            "one worker did everything: {} / {}",
            set_a.len(),
            set_b.len()
        );
        ensure!(
            set_a.is_disjoint(&set_b),
            "a row was delivered by both workers"
        );
        ensure!(
            set_a.len() + set_b.len() == 12_000,
            "{} + {}",
            set_a.len(),
            set_b.len()
        );
        ensure!(
            app.sim.sim.duplicate_events_dropped() == 0,
            "an event was sent twice"
        );
        ensure!(app.sim.sim.event_count() == event_ids.len());
        app.stop().await
    }
);

db_test!(
    an_in_process_worker_delivers_within_a_second_of_acceptance,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let mut config = app.ctx.settings.delivery.clone();
        config.poll_interval = Duration::from_secs(3600); // only the wake-up can make it deliver
        let worker = tokio::spawn(sharpsend_core::outbox::run_worker(
            app.ctx.clone(),
            "live".into(),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        let mut client = app.profiles().await?;
        let accepted = client
            .track_event(TrackEventRequest {
                customer_id: "u00002".into(),
                name: "sharpsend_assignment_approved".into(),
                data: None,
                timestamp: None,
                idempotency_key: String::new(),
            })
            .await?
            .into_inner();
        let started = std::time::Instant::now();
        while app.sim.sim.events_for("u00002").is_empty() {
            ensure!(
                started.elapsed() < Duration::from_secs(1),
                "event not delivered within a second"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        ensure!(
            app.sim.sim.events_for("u00002")[0].id.as_deref() == Some(accepted.event_id.as_str())
        );
        let _ = stop.send(());
        worker.await?;
        app.stop().await
    }
);

/// Delivery settings whose retries wait a minute: a failed row stays behind until the test
/// moves the clock.
fn slow_retries(app: &TestApp) -> sharpsend_core::outbox::DeliveryConfig {
    let mut config = app.ctx.settings.delivery.clone();
    config.retry_base = Duration::from_secs(60);
    config.retry_max = Duration::from_secs(60);
    config
}

/// Every Track request fails with 503 (each of the client's attempts) until `failing(false)`.
fn track_failing(app: &TestApp, on: bool) {
    let chaos = if on {
        Chaos {
            error_rate: 1.0,
            error_status: 503,
            latency: Duration::ZERO,
            drop_rate: 0.0,
        }
    } else {
        Chaos::default()
    };
    app.sim.sim.set_chaos(Some(SimApi::Track), chaos);
}

/// A second context on its own connection pool: another worker or replica.
async fn another_replica(
    app: &TestApp,
    db: &TestDatabase,
) -> anyhow::Result<sharpsend_core::AppContext> {
    Ok(sharpsend_core::AppContext::new(
        db.connect_again().await?,
        app.ctx.cio.clone(),
        (*app.ctx.workspace).clone(),
        app.ctx.settings.clone(),
        app.ctx.clock.clone(),
    ))
}

/// Where the first accepted Track request whose body contains `needle` stands in the
/// simulator's log (processing order), and where in that body: a batch's operations are
/// processed in order.
fn processed_at(app: &TestApp, needle: &str) -> anyhow::Result<(usize, usize)> {
    app.sim
        .sim
        .requests()
        .iter()
        .enumerate()
        .find_map(|(i, r)| {
            let body = r.body.as_ref().map(Value::to_string).unwrap_or_default();
            body.find(needle)
                .filter(|_| r.status == 200)
                .map(|at| (i, at))
        })
        .with_context(|| format!("no accepted request carries {needle}"))
}

fn attribute_update(id: &str, attrs: Value) -> UpdateAttributesRequest {
    UpdateAttributesRequest {
        customer_id: id.into(),
        attributes: Some(to_struct(attrs)),
    }
}

db_test!(
    an_older_update_retried_after_a_newer_one_never_overwrites_it,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let config = slow_retries(&app);
        client
            .update_attributes(attribute_update("u-order", json!({"plan": "free"})))
            .await?;
        // U1 meets an outage: retried in a minute.
        track_failing(&app, true);
        let first = sharpsend_core::outbox::drain(&app.ctx, "worker-a", &config).await?;
        ensure!(first.retried == 1, "{first:?}");
        track_failing(&app, false);
        // U2 is accepted; another replica's worker looks for work.
        client
            .update_attributes(attribute_update("u-order", json!({"plan": "pro"})))
            .await?;
        let other = another_replica(&app, &db).await?;
        let second = sharpsend_core::outbox::drain(&other, "worker-b", &config).await?;
        ensure!(
            second.delivered == 0,
            "U2 went out while U1 waited for its retry: {second:?}"
        );
        app.advance(Duration::from_secs(120));
        app.deliver_all("worker-a", Duration::from_secs(30)).await?;
        let person = app.sim.sim.person("u-order").context("person")?;
        ensure!(
            person.attributes.get("plan") == Some(&json!("pro")),
            "Customer.io holds {:?}, the mirror pro",
            person.attributes.get("plan")
        );
        app.stop().await
    }
);

db_test!(
    an_event_never_reaches_customer_io_before_an_update_accepted_earlier,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let config = slow_retries(&app);
        // Across steps: the identify waits for its retry; the event accepted after it waits too.
        client
            .update_attributes(attribute_update("u-event", json!({"tier": "gold-7"})))
            .await?;
        track_failing(&app, true);
        sharpsend_core::outbox::drain(&app.ctx, "worker-a", &config).await?;
        track_failing(&app, false);
        let event = client
            .track_event(TrackEventRequest {
                customer_id: "u-event".into(),
                name: "upgraded".into(),
                data: None,
                timestamp: None,
                idempotency_key: String::new(),
            })
            .await?
            .into_inner();
        let other = another_replica(&app, &db).await?;
        sharpsend_core::outbox::drain(&other, "worker-b", &config).await?;
        app.advance(Duration::from_secs(120));
        app.deliver_all("worker-a", Duration::from_secs(30)).await?;
        let identify = processed_at(&app, "gold-7")?;
        let tracked = processed_at(&app, &event.event_id)?;
        ensure!(
            identify < tracked,
            "the event ({tracked:?}) reached Customer.io before the update accepted earlier ({identify:?})"
        );

        // Within one step: an event too big for a batch goes through v1, after the batch that
        // carries the person's earlier update, and not at all while that batch must be retried.
        client
            .update_attributes(attribute_update("u-big", json!({"tier": "gold-8"})))
            .await?;
        let big = client
            .track_event(TrackEventRequest {
                customer_id: "u-big".into(),
                name: "report_downloaded".into(),
                data: Some(to_struct(json!({"blob": "z".repeat(40_000)}))),
                timestamp: None,
                idempotency_key: String::new(),
            })
            .await?
            .into_inner();
        track_failing(&app, true);
        let step = sharpsend_core::outbox::drain(&app.ctx, "worker-a", &config).await?;
        track_failing(&app, false);
        ensure!(step.delivered == 0 && step.retried == 1, "{step:?}");
        ensure!(app.sim.sim.events_for("u-big").is_empty());
        app.advance(Duration::from_secs(120));
        app.deliver_all("worker-a", Duration::from_secs(30)).await?;
        let identify = processed_at(&app, "gold-8")?;
        let tracked = processed_at(&app, &big.event_id)?;
        ensure!(identify < tracked, "{identify:?} !< {tracked:?}");
        app.stop().await
    }
);

db_test!(
    updates_coalesced_past_300_attributes_are_split_and_a_bad_update_dies_alone,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        // Two valid updates of 200 distinct attributes each: 400 once coalesced.
        let wide = |prefix: &str| {
            Value::Object(
                (0..200)
                    .map(|i| (format!("{prefix}{i}"), json!(i)))
                    .collect(),
            )
        };
        client
            .batch_update_attributes(BatchUpdateAttributesRequest {
                updates: vec![
                    attribute_update("u-wide", wide("a")),
                    attribute_update("u-wide", wide("b")),
                ],
            })
            .await?;
        let report = app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(report.delivered == 2 && report.dead == 0, "{report:?}");
        let person = app.sim.sim.person("u-wide").context("person")?;
        ensure!(
            person.attributes.len() == 400,
            "{} attributes in Customer.io",
            person.attributes.len()
        );
        ensure!(
            app.sim.sim.requests().iter().all(|r| r.status == 200),
            "an operation was rejected"
        );

        // A bad update (a 151-byte name, as an older release might have queued it) and a good
        // one for the same person: only the bad one dies.
        let rows = vec![
            NewAttributeUpdate {
                customer_id: "u-mixed".into(),
                attributes: json!({ "n".repeat(151): 1 })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            },
            NewAttributeUpdate {
                customer_id: "u-mixed".into(),
                attributes: json!({"plan": "pro"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            },
        ];
        sharpsend_db::outbox::accept_attribute_updates(
            &app.ctx.db,
            app.ctx.workspace_id(),
            &rows,
            app.ctx.now(),
        )
        .await?;
        let report = app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(report.delivered == 1 && report.dead == 1, "{report:?}");
        let person = app
            .sim
            .sim
            .person("u-mixed")
            .context("the good update was lost")?;
        ensure!(person.attributes.get("plan") == Some(&json!("pro")));
        let status = client
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        ensure!(
            status.dead == 1
                && status.dead_letters[0]
                    .error
                    .contains("Customer.io rejected"),
            "{status:?}"
        );
        // Re-queued, the bad one dies again, alone.
        client
            .retry_dead_letters(RetryDeadLettersRequest { ids: vec![] })
            .await?;
        let again = app.deliver_all("w", Duration::from_secs(30)).await?;
        ensure!(again.dead == 1 && again.delivered == 0, "{again:?}");
        app.stop().await
    }
);

db_test!(
    retried_dead_letters_never_overwrite_newer_values_and_3xx_408_are_retried,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let mut client = app.profiles().await?;
        let mut config = app.ctx.settings.delivery.clone();
        config.max_attempts = 2;
        // An outage long enough to exhaust the attempts.
        let give_up = |what: &'static str| {
            let app = &app;
            let config = config.clone();
            async move {
                track_failing(app, true);
                for _ in 0..20 {
                    sharpsend_core::outbox::drain(&app.ctx, "w", &config).await?;
                    let stats =
                        sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
                    if stats.pending == 0 && stats.in_flight == 0 {
                        break;
                    }
                    app.advance(Duration::from_secs(1));
                }
                track_failing(app, false);
                let stats =
                    sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
                ensure!(stats.pending == 0, "{what}: {stats:?}");
                anyhow::Ok(())
            }
        };
        client
            .update_attributes(attribute_update(
                "u-dl",
                json!({"plan": "free", "score": 1}),
            ))
            .await?;
        client
            .update_attributes(attribute_update("u-dl", json!({"color": "red"})))
            .await?;
        give_up("outage").await?;
        // Back up: newer values are delivered.
        client
            .update_attributes(attribute_update(
                "u-dl",
                json!({"plan": "pro", "color": "blue"}),
            ))
            .await?;
        app.deliver_all("w", Duration::from_secs(30)).await?;
        // The operator re-queues the dead letters: only what is still the newest goes.
        let requeued = client
            .retry_dead_letters(RetryDeadLettersRequest { ids: vec![] })
            .await?
            .into_inner();
        ensure!(requeued.requeued == 1, "{requeued:?}");
        app.deliver_all("w", Duration::from_secs(30)).await?;
        let person = app.sim.sim.person("u-dl").context("person")?;
        ensure!(
            person.attributes.get("plan") == Some(&json!("pro"))
                && person.attributes.get("color") == Some(&json!("blue"))
                && person.attributes.get("score") == Some(&json!(1)),
            "{:?}",
            person.attributes
        );
        let status = client
            .get_sync_status(GetSyncStatusRequest::default())
            .await?
            .into_inner();
        ensure!(status.dead == 0 && status.pending == 0, "{status:?}");

        // 408 (after the client's own retries) and a 3xx are not the row's fault: retried.
        let slow = slow_retries(&app);
        for status in [408, 302] {
            client
                .update_attributes(attribute_update("u-3xx", json!({"status": status})))
                .await?;
            app.sim.sim.push_faults(
                Some(SimApi::Track),
                (0..4).map(|_| Fault::Status {
                    status,
                    retry_after_secs: None,
                }),
            );
            let step = sharpsend_core::outbox::drain(&app.ctx, "w", &slow).await?;
            app.sim.sim.clear_faults();
            ensure!(step.retried == 1 && step.dead == 0, "{status}: {step:?}");
            app.advance(Duration::from_secs(120));
            let report = app.deliver_all("w", Duration::from_secs(30)).await?;
            ensure!(report.delivered == 1, "{status}: {report:?}");
        }
        app.stop().await
    }
);

db_test!(
    a_worker_told_to_stop_finishes_its_step_and_leaves_the_backlog,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let updates = (0..100)
            .map(|i| sharpsend_core::profiles::AttributeUpdate {
                customer_id: format!("backlog-{i}"),
                attributes: json!({"n": i}).as_object().cloned().unwrap_or_default(),
            })
            .collect();
        sharpsend_core::profiles::update_attributes(&app.ctx, updates, None).await?;
        // Ten rows a step, each step's request a second long: the backlog is ten steps.
        app.sim.sim.push_faults(
            Some(SimApi::Track),
            (0..20).map(|_| Fault::Delay(Duration::from_secs(1))),
        );
        let config = sharpsend_core::outbox::DeliveryConfig {
            claim_limit: 10,
            ..sharpsend_tests::test_delivery_config()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let worker = tokio::spawn(sharpsend_core::outbox::run_worker(
            app.ctx.clone(),
            "stopping-worker".into(),
            config,
            async move {
                let _ = stopped.await;
            },
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while app.sim.sim.request_count(SimApi::Track) == 0 {
            ensure!(
                std::time::Instant::now() < deadline,
                "the worker never sent"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), worker)
            .await
            .context("the worker went on draining after it was told to stop")??;
        let left = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(left.pending >= 70, "{left:?}");
        app.stop().await
    }
);
