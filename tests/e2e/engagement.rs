//! Engagement flowing back (issue #13), end to end on both databases: the simulator's signed
//! reporting webhooks over real HTTP into the server's webhook endpoint, the delivery-poll and
//! engagement-scoring jobs, scores delivered to the simulator through the outbox, and a managed
//! segment on `sharpsend_engagement_score` following engagement.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use cio_sim::ReportingWebhook;
use secrecy::SecretString;
use serde_json::{Value, json};
use sharpsend_core::engagement::{self, EventSource};
use sharpsend_core::jobs::{Job, JobOutcome};
use sharpsend_db::{db_test, testing::TestDatabase};
use sharpsend_proto::v1::{self as pb, CreateSegmentRequest};
use sharpsend_tests::TestApp;
use tokio::net::TcpListener;

const KEY: &str = "whsec-e2e-0123456789";
/// The demo's API-triggered broadcast "Assignment Alert".
const BROADCAST: i64 = 3;

/// The webhook endpoint of `app`, served on `listener` until the test ends.
fn serve_webhooks(app: &TestApp, listener: TcpListener) {
    tokio::spawn(sharpsend_server::webhooks::serve(
        listener,
        app.ctx.clone(),
        SecretString::from(KEY),
        std::future::pending(),
    ));
}

async fn endpoint(app: &TestApp) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}{}",
        listener.local_addr()?,
        sharpsend_server::webhooks::WEBHOOK_PATH
    );
    serve_webhooks(app, listener);
    Ok(url)
}

fn segment(app: &TestApp, name: &str) -> anyhow::Result<i64> {
    app.sim
        .sim
        .segments()
        .iter()
        .find(|s| s.name == name)
        .map(|s| s.id)
        .with_context(|| format!("no demo segment {name}"))
}

/// A manual segment of `n` engaged demo readers (small, so the simulator's one-at-a-time
/// webhook sender finishes quickly on a busy machine), synced into the mirror.
async fn small_segment(app: &TestApp, n: usize) -> anyhow::Result<i64> {
    let engaged = segment(app, "High Engagement")?;
    let members = app.sim.sim.segment_members(engaged).context("members")?;
    let ids: Vec<&str> = members.iter().take(n).map(String::as_str).collect();
    let id = app
        .sim
        .sim
        .create_manual_segment("Engagement e2e", "a few engaged readers");
    app.sim.sim.add_to_manual_segment(id, &ids)?;
    app.run_job(Job::SegmentSync).await?;
    Ok(id)
}

/// Sends `assignment` to `segment_id` through the broadcast and waits until Customer.io has
/// the trigger; answers the trigger id.
async fn send(app: &TestApp, assignment: &str, segment_id: i64) -> anyhow::Result<i64> {
    let sent = app
        .campaigns()
        .await?
        .send_assignment(pb::SendAssignmentRequest {
            assignment_id: assignment.into(),
            title: "Q4 outlook".into(),
            subject: "Your Q4 outlook".into(),
            segment_ids: vec![segment_id],
            variations: vec![pb::ContentVariation {
                segment_id,
                body: "<p>Q4</p>".into(),
                ..Default::default()
            }],
            delivery: Some(pb::send_assignment_request::Delivery::Broadcast(
                pb::BroadcastDelivery {
                    broadcast_id: BROADCAST,
                },
            )),
            content_types: vec!["growth".into(), "dividends".into()],
            ..Default::default()
        })
        .await?
        .into_inner()
        .send
        .context("no send")?;
    let got = app
        .dispatch_until_submitted(&sent.id, 1, Duration::ZERO, Duration::from_secs(20))
        .await?;
    got.submissions
        .iter()
        .map(|s| s.cio_trigger_id)
        .find(|t| *t > 0)
        .context("a submission with a trigger")
}

async fn all_events(app: &TestApp) -> anyhow::Result<Vec<engagement::DeliveryEvent>> {
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = engagement::events_after(&app.ctx, after, None, 1000).await?;
        let Some(last) = page.last() else {
            return Ok(out);
        };
        after = last.id;
        out.extend(page);
    }
}

/// Moves the simulator's clock on until every reported event was acknowledged (attempts that
/// timed out on a busy machine are retried after a backoff on that clock).
async fn settle_webhooks(app: &TestApp) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        app.sim.sim.advance(Duration::from_secs(3600));
        ensure!(
            app.sim.sim.webhooks_settled(Duration::from_secs(30)).await,
            "webhooks not settled"
        );
        if app.sim.sim.webhook_ledger().iter().all(|h| h.delivered()) {
            return Ok(());
        }
        ensure!(std::time::Instant::now() < deadline, "webhooks undelivered");
    }
}

/// POSTs `body` signed with `key` at `signed_at` (`None`: no signature headers).
async fn post(
    url: &str,
    key: &str,
    signed_at: Option<i64>,
    body: &str,
) -> anyhow::Result<(u16, Value)> {
    let mut request = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(at) = signed_at {
        request = request.header("X-CIO-Timestamp", at.to_string()).header(
            "X-CIO-Signature",
            cio_sim::sign_webhook(key, at, body.as_bytes()),
        );
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

fn now_secs(app: &TestApp) -> i64 {
    app.ctx.now().timestamp()
}

db_test!(
    signed_events_are_stored_once_under_duplicates_and_retries_and_attributed,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let target = small_segment(&app, 60).await?;
        // The endpoint's port is taken but nothing answers yet: the first attempts time out
        // and Customer.io (the simulator) holds every later event back and retries.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!(
            "http://{}{}",
            listener.local_addr()?,
            sharpsend_server::webhooks::WEBHOOK_PATH
        );
        app.sim.sim.set_reporting_webhook(Some(ReportingWebhook {
            duplicate_rate: 0.5,
            timeout: Duration::from_millis(200),
            ..ReportingWebhook::new(&url, KEY)
        }))?;
        let trigger = send(&app, "asg-webhooks", target).await?;
        app.sim.sim.advance(Duration::from_secs(2 * 86_400));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !app
            .sim
            .sim
            .webhook_ledger()
            .iter()
            .any(|h| h.attempts.iter().any(|a| !a.succeeded()))
        {
            ensure!(
                std::time::Instant::now() < deadline,
                "no failed attempt yet"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        serve_webhooks(&app, listener);
        settle_webhooks(&app).await?;
        let ledger = app.sim.sim.webhook_ledger();
        ensure!(
            ledger.iter().any(|h| h.copies == 2),
            "no duplicate was sent"
        );
        ensure!(
            ledger
                .iter()
                .any(|h| h.attempts.len() > h.copies as usize && h.delivered()),
            "no event was retried"
        );
        let stored = all_events(&app).await?;
        let sent_ids: BTreeSet<&str> = ledger.iter().map(|h| h.event_id.as_str()).collect();
        let stored_ids: BTreeSet<&str> = stored.iter().map(|e| e.event_id.as_str()).collect();
        ensure!(
            stored.len() == ledger.len() && sent_ids == stored_ids,
            "{} stored for {} sent",
            stored.len(),
            ledger.len()
        );
        ensure!(stored.iter().all(|e| e.source == EventSource::Webhook));
        // Attribution: every event of our trigger names the send's assignment and segment.
        let ours: Vec<_> = stored
            .iter()
            .filter(|e| e.trigger_id == Some(trigger))
            .collect();
        ensure!(!ours.is_empty(), "no event of trigger {trigger}");
        ensure!(
            ours.iter()
                .all(|e| e.assignment_id.as_deref() == Some("asg-webhooks")
                    && e.segment_id == Some(target)
                    && e.send_id.is_some()),
            "{:?}",
            ours.first()
        );
        ensure!(
            ours.iter().any(|e| e.metric == "opened"),
            "no opens among {} events",
            ours.len()
        );
        app.stop().await
    }
);

db_test!(
    forged_unsigned_and_stale_requests_are_refused_and_unknown_events_quarantined,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let url = endpoint(&app).await?;
        let now = now_secs(&app);
        let body = json!({"event_id": "01HZZZ0000000000000000001", "object_type": "email",
            "metric": "delivered", "timestamp": now,
            "data": {"delivery_id": "d-1", "customer_id": "p-1", "broadcast_id": 3, "trigger_id": 99}})
        .to_string();
        for (what, key, at) in [
            ("forged", "not-the-key", Some(now)),
            ("unsigned", KEY, None),
            ("stale", KEY, Some(now - 400)),
            ("from the future", KEY, Some(now + 400)),
        ] {
            let (status, answer) = post(&url, key, at, &body).await?;
            ensure!(status == 401, "{what}: {status} {answer}");
        }
        // A tampered body under a valid signature of another body.
        let signed = cio_sim::sign_webhook(KEY, now, b"{}");
        let tampered = reqwest::Client::new()
            .post(&url)
            .header("X-CIO-Timestamp", now.to_string())
            .header("X-CIO-Signature", signed)
            .body(body.clone())
            .send()
            .await?;
        ensure!(tampered.status().as_u16() == 401);
        ensure!(
            all_events(&app).await?.is_empty(),
            "a refused event was stored"
        );
        ensure!(engagement::quarantined(&app.ctx, 0, 10).await?.is_empty());

        // Signed and understood: stored once, however often it comes.
        for _ in 0..3 {
            let (status, answer) = post(&url, KEY, Some(now), &body).await?;
            ensure!(
                status == 200 && answer["status"] == "stored",
                "{status} {answer}"
            );
        }
        ensure!(all_events(&app).await?.len() == 1);

        // Signed but not understood: 2xx (Customer.io must not hold later events back), kept.
        let odd = json!({"event_id": "01HZZZ0000000000000000002", "object_type": "email",
            "metric": "teleported", "timestamp": now, "data": {}})
        .to_string();
        let (status, answer) = post(&url, KEY, Some(now), &odd).await?;
        ensure!(
            status == 200 && answer["status"] == "quarantined",
            "{status} {answer}"
        );
        let (status, _) = post(&url, KEY, Some(now), "not json at all").await?;
        ensure!(status == 200);
        let kept = engagement::quarantined(&app.ctx, 0, 10).await?;
        ensure!(kept.len() == 2, "{kept:?}");
        ensure!(kept[0].reason.contains("teleported") && kept[0].body == odd);
        ensure!(kept[1].body == "not json at all");
        ensure!(
            all_events(&app).await?.len() == 1,
            "a quarantined body became an event"
        );
        app.stop().await
    }
);

db_test!(
    polling_finds_the_same_events_as_webhooks_and_nothing_counts_twice,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        let target = small_segment(&app, 150).await?;
        // Webhooks are configured, but the endpoint answers only after the poll ran.
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!(
            "http://{}{}",
            listener.local_addr()?,
            sharpsend_server::webhooks::WEBHOOK_PATH
        );
        app.sim.sim.set_reporting_webhook(Some(ReportingWebhook {
            timeout: Duration::from_millis(200),
            ..ReportingWebhook::new(&url, KEY)
        }))?;
        send(&app, "asg-poll", target).await?;
        app.sim.sim.advance(Duration::from_secs(2 * 86_400));

        let JobOutcome::Succeeded { details, .. } = app.run_job(Job::DeliveryPoll).await? else {
            bail!("poll skipped");
        };
        ensure!(details["stored"].as_u64() > Some(0), "{details}");
        let scored_poll = facts_summary(&app).await?;

        serve_webhooks(&app, listener);
        settle_webhooks(&app).await?;
        let events = all_events(&app).await?;
        let pairs = |source: EventSource| -> BTreeSet<(String, String)> {
            events
                .iter()
                .filter(|e| e.source == source && e.send_id.is_some())
                .filter_map(|e| Some((e.delivery_id.clone()?, e.metric.clone())))
                .collect()
        };
        let polled = pairs(EventSource::Poll);
        let hooked = pairs(EventSource::Webhook);
        ensure!(!polled.is_empty());
        ensure!(
            polled == hooked,
            "poll and webhooks differ: only polled {:?}, only webhooks {:?}",
            polled.difference(&hooked).take(5).collect::<Vec<_>>(),
            hooked.difference(&polled).take(5).collect::<Vec<_>>()
        );
        // A second poll adds nothing; the counts per person do not change with both paths
        // except where a webhook says an open was a machine's.
        let JobOutcome::Succeeded { details, .. } = app.run_job(Job::DeliveryPoll).await? else {
            bail!("poll skipped");
        };
        ensure!(details["stored"] == 0, "{details}");
        // With both paths, each delivery counts once, as the webhooks alone tell it (their
        // prefetched/machine flags decide what the poll cannot know).
        let scored_both = facts_summary(&app).await?;
        let hooks_only = summary_of_webhooks(&events);
        ensure!(
            scored_both == hooks_only,
            "both paths {scored_both:?} vs webhooks alone {hooks_only:?} (poll alone {scored_poll:?})"
        );
        ensure!(scored_both.0 == scored_poll.0, "deliveries differ");
        app.stop().await
    }
);

/// (delivered deliveries, human-opened, human-clicked) over everyone.
async fn facts_summary(app: &TestApp) -> anyhow::Result<(usize, usize, usize)> {
    let facts = sharpsend_db::engagement::delivery_facts(
        &app.ctx.db,
        app.ctx.workspace_id(),
        "",
        1_000_000,
    )
    .await?;
    Ok((
        facts.iter().filter(|f| f.delivered).count(),
        facts.iter().filter(|f| f.human_open).count(),
        facts.iter().filter(|f| f.human_click).count(),
    ))
}

/// (delivered deliveries, human-opened, human-clicked) from the webhook events alone.
fn summary_of_webhooks(events: &[engagement::DeliveryEvent]) -> (usize, usize, usize) {
    let mut per: std::collections::BTreeMap<&str, (bool, bool, bool)> = Default::default();
    for e in events
        .iter()
        .filter(|e| e.source == EventSource::Webhook && e.send_id.is_some())
    {
        let Some(d) = e.delivery_id.as_deref() else {
            continue;
        };
        let entry = per.entry(d).or_default();
        match e.metric.as_str() {
            "delivered" | "converted" => entry.0 = true,
            "opened" => {
                entry.0 = true;
                // A synthetic open is as human as the click it was inferred from.
                entry.1 |= !e.prefetched && !e.synthetic;
            }
            "clicked" => {
                entry.0 = true;
                entry.1 |= !e.machine;
                entry.2 |= !e.machine;
            }
            _ => {}
        }
    }
    (
        per.values().filter(|v| v.0).count(),
        per.values().filter(|v| v.1).count(),
        per.values().filter(|v| v.2).count(),
    )
}

fn event(id: &str, metric: &str, delivery: &str, person: &str, trigger: i64, at: i64) -> String {
    json!({"event_id": id, "object_type": "email", "metric": metric, "timestamp": at,
        "data": {"delivery_id": delivery, "customer_id": person, "broadcast_id": BROADCAST,
                 "trigger_id": trigger, "action_id": 1, "machine": false, "prefetched": false,
                 "identifiers": {"id": person}}})
    .to_string()
}

/// Scores, evaluates managed segments, delivers the outbox.
async fn refresh(app: &TestApp) -> anyhow::Result<()> {
    app.run_job(Job::EngagementScoring).await?;
    app.run_job(Job::SegmentEvaluation).await?;
    app.deliver_all("e2e", Duration::from_secs(30)).await?;
    Ok(())
}

fn identify_calls(app: &TestApp, person: &str) -> usize {
    let path = format!("/api/v1/customers/{person}");
    app.sim
        .sim
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path == path)
        .count()
}

db_test!(
    scores_reach_customer_io_only_when_changed_and_a_managed_segment_follows_them,
    |db: TestDatabase| async move {
        let app = TestApp::spawn(&db).await?;
        app.run_job(Job::SegmentSync).await?;
        let target = segment(&app, "High Engagement")?;
        let members = app.sim.sim.segment_members(target).context("members")?;
        let person = members.first().context("no member")?.clone();
        let url = endpoint(&app).await?;
        let trigger = send(&app, "asg-score", target).await?;
        let managed = app
            .segments()
            .await?
            .create_segment(CreateSegmentRequest {
                name: "Engaged readers".into(),
                description: "follows engagement".into(),
                criteria: None,
                criteria_json: json!({"attribute": {"field": "sharpsend_engagement_score",
                    "operator": "gte", "value": 50}})
                .to_string(),
                request_id: String::new(),
            })
            .await?
            .into_inner()
            .segment
            .context("segment")?;
        let in_segment = |app: &TestApp| -> anyhow::Result<bool> {
            Ok(app
                .sim
                .sim
                .segment_members(managed.id)
                .context("managed segment in the simulator")?
                .contains(&person))
        };
        ensure!(!in_segment(&app)?);

        // One delivery the person clicked (and a machine-scanned link of another person's).
        let now = now_secs(&app);
        for (i, metric) in ["delivered", "opened", "clicked"].iter().enumerate() {
            let body = event(&format!("ev-a{i}"), metric, "dl-a", &person, trigger, now);
            let (status, _) = post(&url, KEY, Some(now), &body).await?;
            ensure!(status == 200);
        }
        refresh(&app).await?;
        let attributes = app.sim.sim.person(&person).context("person")?.attributes;
        ensure!(
            attributes.get("sharpsend_engagement_score") == Some(&json!(50))
                && attributes.get("assignment_click_rate") == Some(&json!(1.0))
                && attributes.get("sharpsend_assignment_interactions") == Some(&json!(1))
                && attributes.get("preferred_content_types")
                    == Some(&json!(["dividends", "growth"])),
            "{attributes:?}"
        );
        ensure!(in_segment(&app)?, "the engaged person did not join");

        // Nothing changed: nothing is written again.
        let calls = identify_calls(&app, &person);
        let JobOutcome::Succeeded { details, .. } = app.run_job(Job::EngagementScoring).await?
        else {
            bail!("skipped");
        };
        ensure!(details["changed"] == 0, "{details}");
        app.deliver_all("e2e", Duration::from_secs(30)).await?;
        ensure!(
            identify_calls(&app, &person) == calls,
            "an unchanged score was sent again"
        );

        // Three more deliveries go unread: 100 × 1 / (4 + 1) = 20 — the person leaves.
        for d in 0..3 {
            let body = event(
                &format!("ev-b{d}"),
                "delivered",
                &format!("dl-b{d}"),
                &person,
                trigger,
                now,
            );
            let (status, _) = post(&url, KEY, Some(now), &body).await?;
            ensure!(status == 200);
        }
        refresh(&app).await?;
        let attributes = app.sim.sim.person(&person).context("person")?.attributes;
        ensure!(
            attributes.get("sharpsend_engagement_score") == Some(&json!(20))
                && attributes.get("assignment_open_rate") == Some(&json!(0.25)),
            "{attributes:?}"
        );
        ensure!(
            !in_segment(&app)?,
            "the person stayed after engagement dropped"
        );
        app.stop().await
    }
);
