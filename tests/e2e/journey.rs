//! `CampaignService.TriggerJourneyEvent` end to end: an event for every member of the target
//! segments (Customer.io segments read fresh, managed segments from SharpSend's record), once
//! per person, through the outbox; calling again sends Customer.io nothing twice.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::{Context, ensure};
use chrono::Utc;
use cio_client::{Identifier, PersonOp};
use cio_sim::{Predicate, SimConfig, SimEvent};
use prost_types::Struct;
use serde_json::{Map, Value, json};
use sharpsend_core::journey::{DEFAULT_EVENT_NAME, journey_event_id};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{
    AddSegmentMembersRequest, CreateSegmentRequest, TriggerJourneyEventRequest,
    TriggerJourneyEventResponse,
};
use sharpsend_tests::{TestApp, bad_request_fields};
use tonic::Code;

fn to_struct(value: Value) -> Struct {
    sharpsend_server::convert::json_to_struct(value.as_object().unwrap_or(&Map::new()))
}

fn trigger(
    assignment_id: &str,
    event_name: &str,
    segment_ids: &[i64],
    data: Value,
) -> TriggerJourneyEventRequest {
    TriggerJourneyEventRequest {
        assignment_id: assignment_id.into(),
        event_name: event_name.into(),
        segment_ids: segment_ids.to_vec(),
        data: Some(to_struct(data)),
    }
}

fn counts(r: &TriggerJourneyEventResponse) -> (i64, i64, i64) {
    (r.members, r.recorded, r.already_recorded)
}

/// The simulator's events named `name`, by person.
fn events_named(app: &TestApp, name: &str) -> BTreeMap<String, Vec<SimEvent>> {
    let mut out: BTreeMap<String, Vec<SimEvent>> = BTreeMap::new();
    for event in app.sim.sim.events().into_iter().filter(|e| e.name == name) {
        out.entry(event.person_id.clone().unwrap_or_default())
            .or_default()
            .push(event);
    }
    out
}

fn person(n: usize) -> String {
    format!("p{n:03}")
}

db_test!(
    journey_events_reach_every_member_of_the_target_segments_once_each,
    |db: TestDatabase| async move {
        let app = TestApp::spawn_with(&db, SimConfig::empty(), |_| {}).await?;
        let sim = &app.sim.sim;
        let mut segments = app.segments().await?;
        let mut campaigns = app.campaigns().await?;

        // 300 people. Customer.io segment A (manual): p000-p199. Customer.io segment C (dynamic,
        // cohort = spring): p250-p259 and one person known only by email (no `id`).
        for n in 0..300 {
            let cohort = if (250..260).contains(&n) {
                "spring"
            } else {
                "winter"
            };
            sim.upsert_person(
                &person(n),
                json!({"cohort": cohort})
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            );
        }
        let email_only = PersonOp::identify(
            Identifier::Email("no-id@example.com".into()),
            json!({"cohort": "spring"})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        app.ctx.cio.batch(&[email_only]).await?;
        ensure!(
            sim.person_by_email("no-id@example.com")
                .is_some_and(|p| p.id.is_none())
        );
        let seg_a = sim.create_manual_segment("Approved readers", "");
        let a_ids: Vec<String> = (0..200).map(person).collect();
        sim.add_to_manual_segment(seg_a, &a_ids.iter().map(String::as_str).collect::<Vec<_>>())?;
        let seg_c = sim.add_dynamic_segment(
            "Spring cohort",
            "",
            Predicate::Eq("cohort".into(), json!("spring")),
        );
        ensure!(sim.segment_members(seg_c).is_some_and(|m| m.len() == 11));
        app.sync_segments().await?;

        // Managed segment B (SharpSend's own, created after the sync): p150-p299. Its membership is
        // not delivered to Customer.io yet: SharpSend's record is what counts.
        let seg_b = segments
            .create_segment(CreateSegmentRequest {
                name: "Approved readers B".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?
            .id;
        segments
            .add_segment_members(AddSegmentMembersRequest {
                segment_id: seg_b,
                customer_ids: (150..300).map(person).collect(),
            })
            .await?;
        ensure!(
            sim.segment_members(seg_b).is_some_and(|m| m.is_empty()),
            "membership goes through the outbox"
        );

        let request = trigger(
            "a-1",
            "",
            &[seg_a, seg_b, seg_c],
            json!({"headline": "Buy the dip"}),
        );
        let first = campaigns
            .trigger_journey_event(request.clone())
            .await?
            .into_inner();
        ensure!(
            counts(&first) == (300, 300, 0) && first.skipped_without_id == 1,
            "{first:?}"
        );
        app.deliver_all("w", Duration::from_secs(60)).await?;

        let events = events_named(&app, DEFAULT_EVENT_NAME);
        ensure!(events.len() == 300, "{} people got the event", events.len());
        for n in 0..300 {
            let id = person(n);
            let got = events
                .get(&id)
                .with_context(|| format!("{id} got no event"))?;
            ensure!(got.len() == 1, "{id} got {} events", got.len());
            let event = &got[0];
            // Selected through the first target segment (in request order) that holds the person.
            let through = if n < 200 { seg_a } else { seg_b };
            ensure!(
                event.data
                    == json!({"headline": "Buy the dip", "assignment_id": "a-1", "segment_id": through}),
                "{id}: {}",
                event.data
            );
            let expected_id = journey_event_id(DEFAULT_EVENT_NAME, "a-1", &id).to_string();
            ensure!(
                event.id.as_deref() == Some(expected_id.as_str()),
                "{id}: {:?}",
                event.id
            );
            ensure!(
                event
                    .timestamp
                    .is_some_and(|t| (Utc::now().timestamp() - t).abs() < 120),
                "{id}: {:?}",
                event.timestamp
            );
        }
        ensure!(
            sim.events().len() == 300,
            "nothing else was sent (the email-only person is skipped)"
        );

        // Again: nothing new in the outbox, nothing new in Customer.io.
        let again = campaigns
            .trigger_journey_event(request.clone())
            .await?
            .into_inner();
        ensure!(counts(&again) == (300, 0, 300), "{again:?}");
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(stats.pending == 0 && stats.in_flight == 0, "{stats:?}");
        ensure!(sim.events().len() == 300 && sim.duplicate_events_dropped() == 0);

        // Even once the outbox has forgotten the delivered rows, the ids are the same, so
        // Customer.io drops the repeats.
        let purged = sharpsend_db::outbox::purge_delivered(
            &app.ctx.db,
            app.ctx.workspace_id(),
            Utc::now() + chrono::Duration::hours(1),
        )
        .await?;
        ensure!(purged >= 300, "{purged} purged");
        let forgotten = campaigns.trigger_journey_event(request).await?.into_inner();
        ensure!(counts(&forgotten) == (300, 300, 0), "{forgotten:?}");
        app.deliver_all("w", Duration::from_secs(60)).await?;
        ensure!(sim.events().len() == 300, "{} events", sim.events().len());
        ensure!(
            sim.duplicate_events_dropped() == 300,
            "{} duplicates dropped",
            sim.duplicate_events_dropped()
        );

        // Another event, or another assignment, is another event.
        let reminder = campaigns
            .trigger_journey_event(trigger("a-1", "assignment_reminder", &[seg_c], json!({})))
            .await?
            .into_inner();
        ensure!(counts(&reminder) == (10, 10, 0), "{reminder:?}");
        let other = campaigns
            .trigger_journey_event(trigger("a-2", "", &[seg_c], json!({})))
            .await?
            .into_inner();
        ensure!(counts(&other) == (10, 10, 0), "{other:?}");
        app.deliver_all("w", Duration::from_secs(60)).await?;
        let reminders = events_named(&app, "assignment_reminder");
        ensure!(
            reminders.keys().cloned().collect::<Vec<_>>()
                == (250..260).map(person).collect::<Vec<_>>()
        );
        ensure!(
            reminders.values().all(|e| e.len() == 1
                && e[0].data == json!({"assignment_id": "a-1", "segment_id": seg_c}))
        );
        ensure!(sim.events().len() == 320 && sim.duplicate_events_dropped() == 300);
        app.stop().await
    }
);

db_test!(
    overlapping_demo_segments_give_each_person_one_event,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let sim = &app.sim.sim;
        let mut campaigns = app.campaigns().await?;
        app.sync_segments().await?;
        let targets: Vec<i64> = sim
            .segments()
            .into_iter()
            .filter(|s| s.member_count > 0)
            .map(|s| s.id)
            .collect();
        ensure!(targets.len() >= 4, "{targets:?}");
        let mut expected: HashMap<String, i64> = HashMap::new();
        let mut memberships = 0;
        for &segment in &targets {
            for id in sim.segment_members(segment).context("segment")? {
                memberships += 1;
                expected.entry(id).or_insert(segment);
            }
        }
        ensure!(
            memberships > expected.len() + 1000,
            "the demo segments overlap: {memberships} memberships, {} people",
            expected.len()
        );
        let before = sim.events().len();

        let response = campaigns
            .trigger_journey_event(trigger(
                "a-demo",
                "assignment_live",
                &targets,
                json!({"tier": "all"}),
            ))
            .await?
            .into_inner();
        ensure!(
            counts(&response) == (expected.len() as i64, expected.len() as i64, 0),
            "{response:?}"
        );
        app.deliver_all("w", Duration::from_secs(120)).await?;
        let events = events_named(&app, "assignment_live");
        ensure!(
            events.len() == expected.len(),
            "{} of {} people",
            events.len(),
            expected.len()
        );
        for (id, got) in &events {
            let through = expected
                .get(id)
                .with_context(|| format!("{id} is in no target segment"))?;
            ensure!(got.len() == 1, "{id}: {} events", got.len());
            ensure!(
                got[0].data
                    == json!({"tier": "all", "assignment_id": "a-demo", "segment_id": through}),
                "{id}: {}",
                got[0].data
            );
        }
        ensure!(sim.events().len() == before + expected.len());
        app.stop().await
    }
);

db_test!(
    every_invalid_field_is_named_and_nothing_is_recorded,
    |db: TestDatabase| async move {
        let app = TestApp::spawn_with(&db, SimConfig::empty(), |_| {}).await?;
        let sim = &app.sim.sim;
        let mut campaigns = app.campaigns().await?;
        sim.upsert_person("p1", Map::new());
        let known = sim.create_manual_segment("Known", "");
        sim.add_to_manual_segment(known, &["p1"])?;
        let removed = sim.create_manual_segment("Removed later", "");
        app.sync_segments().await?;
        sim.delete_segment(removed);
        app.sync_segments().await?;

        let cases: Vec<(TriggerJourneyEventRequest, Vec<&str>)> = vec![
            (trigger("", "", &[known], json!({})), vec!["assignment_id"]),
            (
                trigger(&"a".repeat(201), "", &[known], json!({})),
                vec!["assignment_id"],
            ),
            (trigger("a-1", "", &[], json!({})), vec!["segment_ids"]),
            (
                trigger("a-1", "", &[known, 0, -3, known], json!({})),
                vec!["segment_ids[1]", "segment_ids[2]", "segment_ids[3]"],
            ),
            (
                trigger("a-1", "", &[known, 999_999], json!({})),
                vec!["segment_ids[1]"],
            ),
            (
                trigger("a-1", "", &[removed, known], json!({})),
                vec!["segment_ids[0]"],
            ),
            (
                trigger("a-1", &"e".repeat(101), &[known], json!({})),
                vec!["event_name"],
            ),
            (
                trigger("a-1", "  ", &[known], json!({})),
                vec!["event_name"],
            ),
            (
                trigger("a-1", "", &[known], json!({"blob": "z".repeat(100_000)})),
                vec!["data"],
            ),
            (
                trigger(
                    "a-1",
                    "",
                    &[known],
                    json!({"assignment_id": "a-2", "segment_id": 4}),
                ),
                vec!["data.assignment_id", "data.segment_id"],
            ),
            (
                trigger("", "", &[], json!({"blob": "z".repeat(100_000)})),
                vec!["assignment_id", "segment_ids", "data"],
            ),
        ];
        for (request, expected) in cases {
            let status = campaigns
                .trigger_journey_event(request.clone())
                .await
                .err()
                .context("accepted")?;
            ensure!(status.code() == Code::InvalidArgument, "{status:?}");
            ensure!(
                bad_request_fields(&status) == expected,
                "{:?} for {expected:?}",
                bad_request_fields(&status)
            );
        }
        let stats = sharpsend_db::outbox::stats(&app.ctx.db, app.ctx.workspace_id()).await?;
        ensure!(stats.pending == 0 && stats.delivered == 0, "{stats:?}");

        // Deleted in Customer.io since the last sync: its members cannot be read.
        let gone = sim.create_manual_segment("Gone", "");
        app.sync_segments().await?;
        sim.delete_segment(gone);
        let status = campaigns
            .trigger_journey_event(trigger("a-1", "", &[gone], json!({})))
            .await
            .err()
            .context("accepted")?;
        ensure!(status.code() == Code::NotFound, "{status:?}");

        // Data that fits, with assignment_id repeated as is: accepted.
        let fits = campaigns
            .trigger_journey_event(trigger(
                "a-1",
                "",
                &[known],
                json!({"assignment_id": "a-1", "blob": "z".repeat(99_900)}),
            ))
            .await?
            .into_inner();
        ensure!(counts(&fits) == (1, 1, 0), "{fits:?}");
        let people: BTreeSet<String> = events_named(&app, DEFAULT_EVENT_NAME).into_keys().collect();
        ensure!(people.is_empty(), "recorded, not delivered yet");
        app.stop().await
    }
);
