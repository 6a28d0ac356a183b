//! Metrics endpoints: series answered from the delivery ledger, shapes by res/start/end and
//! legacy period/steps, validation, and outcome rates drawn reproducibly by seed.

use std::collections::BTreeMap;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, demo_unlimited, empty_unlimited, send, spawn, status_of, unix_now};
use cio_sim::{
    AudienceFilter, DeliveryFilter, DeliveryMetric, DeliveryRates, MetricTotals, NewBroadcast,
    NewCampaign, NewNewsletter, RatesKey, SimConfig,
};

const ASSIGNMENT_ALERT: i64 = 3;
const HIGH_ENGAGEMENT: i64 = 4;

/// Sum of each series.
fn sums(body: &Value) -> BTreeMap<String, u64> {
    body["metric"]["series"]
        .as_object()
        .map(|series| {
            series
                .iter()
                .map(|(k, v)| {
                    let total = v
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).sum())
                        .unwrap_or(0);
                    (k.clone(), total)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn lengths(body: &Value) -> Vec<usize> {
    body["metric"]["series"]
        .as_object()
        .map(|s| {
            s.values()
                .map(|v| v.as_array().map_or(0, Vec::len))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_matches_ledger(sums: &BTreeMap<String, u64>, totals: &MetricTotals) {
    for metric in DeliveryMetric::ALL {
        assert_eq!(
            sums.get(metric.as_str()).copied(),
            Some(totals.get(metric)),
            "{} in {sums:?} vs {totals:?}",
            metric.as_str()
        );
    }
}

async fn metrics(t: &TestSim, path: &str) -> anyhow::Result<Value> {
    let (status, body) = send(t.app(Method::GET, path)).await?;
    anyhow::ensure!(status == 200, "{path}: {status} {body}");
    Ok(body)
}

async fn trigger_segment(t: &TestSim, broadcast: i64, subject: &str) -> anyhow::Result<i64> {
    let (status, body) = send(
        t.app(Method::POST, &format!("/v1/campaigns/{broadcast}/triggers"))
            .json(&json!({"recipients": {"segment": {"id": HIGH_ENGAGEMENT}}, "data": {"subject": subject}})),
    )
    .await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    body["id"].as_i64().ok_or_else(|| anyhow::anyhow!("id"))
}

#[tokio::test]
async fn broadcast_series_sum_to_the_ledger_as_metrics_arrive() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let start = unix_now() - 3600;
    trigger_segment(&t, ASSIGNMENT_ALERT, "Semis").await?;
    let filter = DeliveryFilter::broadcast(ASSIGNMENT_ALERT);
    let eventual = t.sim().eventual_delivery_totals(&filter);
    assert!(
        eventual.sent > 300 && eventual.opened > 0 && eventual.clicked > 0,
        "{eventual:?}"
    );

    let path = |end: i64| {
        format!(
            "/v1/broadcasts/{ASSIGNMENT_ALERT}/metrics?version=2&res=hours&start={start}&end={end}"
        )
    };
    // Right after the send: everything is sent, little else yet.
    let now = metrics(&t, &path(unix_now())).await?;
    let early = t.sim().delivery_totals(&filter);
    assert_eq!(early.sent, eventual.sent);
    assert!(early.human_opened < eventual.human_opened);
    assert_matches_ledger(&sums(&now), &early);

    // Two hours later some opens arrived; three weeks later all of it.
    let window = || {
        format!(
            "/v1/broadcasts/{ASSIGNMENT_ALERT}/metrics?version=2&res=days&start={}&end={}&tz=UTC",
            unix_now() - 40 * 24 * 3600,
            unix_now()
        )
    };
    t.sim().advance(Duration::from_secs(2 * 3600));
    let later = t.sim().delivery_totals(&filter);
    assert!(later.human_opened > early.human_opened && later.human_opened < eventual.human_opened);
    assert_eq!(
        later.delivered + later.bounced,
        eventual.delivered + eventual.bounced
    );
    assert_matches_ledger(&sums(&metrics(&t, &window()).await?), &later);
    t.sim().advance(Duration::from_secs(21 * 24 * 3600));
    let done = t.sim().delivery_totals(&filter);
    assert_eq!(done, eventual);
    let window = window();
    let body = metrics(&t, &window).await?;
    assert_matches_ledger(&sums(&body), &done);
    // No totals object, and unmodeled keys are zeros.
    assert!(body["metric"].get("totals").is_none());
    for key in ["attempted", "failed", "undeliverable", "2xx"] {
        assert_eq!(sums(&body).get(key), Some(&0), "{key}");
    }
    // The send is in the first days of the window: oldest first.
    let sent = body["metric"]["series"]["sent"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let first_nonzero = sent.iter().position(|v| v.as_u64() > Some(0));
    assert!(
        first_nonzero.is_some_and(|i| i < sent.len() - 15),
        "{sent:?}"
    );
    // type=webhook: zeros.
    let webhook = metrics(&t, &format!("{window}&type=webhook")).await?;
    assert_eq!(sums(&webhook).get("sent"), Some(&0));
    Ok(())
}

#[tokio::test]
async fn campaign_newsletter_and_content_metrics_match_their_ledgers() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let campaign = t.sim().add_campaign(NewCampaign::new("Onboarding tips"));
    let people: Vec<String> = (10..40).map(|n| format!("u{n:05}")).collect();
    let people: Vec<&str> = people.iter().map(String::as_str).collect();
    let sent = t.sim().record_campaign_send(campaign, &people)?;
    assert!(sent > 20);
    let newsletter = t.sim().add_newsletter(NewNewsletter::new(
        "Weekly",
        "This week",
        "<p>hi</p>",
        AudienceFilter::segment(HIGH_ENGAGEMENT),
    ))?;
    t.sim().send_newsletter(newsletter)?;
    t.sim().advance(Duration::from_secs(30 * 24 * 3600));
    let window = format!(
        "version=2&res=weeks&start={}&end={}",
        unix_now() - 60 * 24 * 3600,
        unix_now()
    );

    let body = metrics(&t, &format!("/v1/campaigns/{campaign}/metrics?{window}")).await?;
    assert_matches_ledger(
        &sums(&body),
        &t.sim().delivery_totals(&DeliveryFilter::campaign(campaign)),
    );
    assert_eq!(sums(&body).get("sent"), Some(&(sent as u64)));

    let body = metrics(
        &t,
        &format!("/v1/newsletters/{newsletter}/metrics?{window}"),
    )
    .await?;
    let ledger = t
        .sim()
        .delivery_totals(&DeliveryFilter::newsletter(newsletter));
    assert!(ledger.sent > 500);
    assert_matches_ledger(&sums(&body), &ledger);
    let content = t
        .sim()
        .newsletter(newsletter)
        .map(|n| n.content_id)
        .unwrap_or(0);
    for path in [
        format!("/v1/newsletters/{newsletter}/contents/{content}/metrics?{window}"),
        format!("/v1/newsletters/{newsletter}/content/{content}/metrics?{window}"),
    ] {
        assert_matches_ledger(&sums(&metrics(&t, &path).await?), &ledger);
    }
    // The demo's past newsletter and welcome send show up too.
    let demo = metrics(&t, &format!("/v1/newsletters/1/metrics?{window}")).await?;
    assert!(sums(&demo).get("sent").is_some_and(|s| *s > 500));
    let welcome = metrics(&t, &format!("/v1/campaigns/1/metrics?{window}")).await?;
    assert!(sums(&welcome).get("sent").is_some_and(|s| *s > 40));
    Ok(())
}

#[tokio::test]
async fn series_shape_follows_res_start_end_and_legacy_steps() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let base = format!("/v1/broadcasts/{ASSIGNMENT_ALERT}/metrics");
    // 2026-03-01T00:00Z .. 2026-03-03T12:00Z.
    let (start, end) = (1_772_323_200, 1_772_539_200);
    let shape = |q: String| {
        let path = format!("{base}?{q}");
        let t = &t;
        async move {
            let body = metrics(t, &path).await?;
            let lens = lengths(&body);
            anyhow::ensure!(
                lens.iter().all(|l| *l == lens[0]),
                "equal lengths: {lens:?}"
            );
            Ok::<(usize, Value), anyhow::Error>((lens[0], body))
        }
    };
    assert_eq!(
        shape(format!("version=2&res=days&tz=UTC&start={start}&end={end}"))
            .await?
            .0,
        3
    );
    assert_eq!(
        shape(format!(
            "version=2&res=daily&tz=UTC&start={start}&end={end}"
        ))
        .await?
        .0,
        3
    );
    assert_eq!(
        shape(format!(
            "version=2&res=hours&tz=UTC&start={start}&end={end}"
        ))
        .await?
        .0,
        61
    );
    // In New York (UTC-5) the same span touches 4 local days (Feb 28 19:00 .. Mar 3 07:00).
    assert_eq!(
        shape(format!("version=2&res=days&start={start}&end={end}"))
            .await?
            .0,
        4
    );
    assert_eq!(
        shape(format!(
            "version=2&res=weeks&tz=UTC&start={start}&end={end}"
        ))
        .await?
        .0,
        1
    );
    assert_eq!(
        shape(format!(
            "version=2&res=months&tz=UTC&start=1767225600&end={end}"
        ))
        .await?
        .0,
        3
    );
    // Defaults: end = now, start = 24 hours / 45 days / 12 weeks / 12 months of buckets.
    assert_eq!(shape("version=2&res=hours".into()).await?.0, 24);
    assert_eq!(shape("version=2&res=days".into()).await?.0, 45);
    assert_eq!(shape("version=2&res=weeks".into()).await?.0, 12);
    assert_eq!(shape("version=2&res=months".into()).await?.0, 12);
    // Version 2 has the human/prefetch split; version 1 does not.
    let (_, v2) = shape("version=2&res=days".into()).await?;
    let (n, v1) = shape("period=days&steps=7".into()).await?;
    assert_eq!(n, 7);
    for key in [
        "human_opened",
        "prefetch_opened",
        "human_clicked",
        "prefetch_clicked",
    ] {
        assert!(v2["metric"]["series"].get(key).is_some(), "{key}");
        assert!(v1["metric"]["series"].get(key).is_none(), "{key}");
    }
    for key in [
        "sent",
        "delivered",
        "opened",
        "clicked",
        "converted",
        "bounced",
        "spammed",
        "unsubscribed",
    ] {
        assert!(
            v1["metric"]["series"].get(key).is_some() && v2["metric"]["series"].get(key).is_some()
        );
    }
    assert_eq!(shape("".into()).await?.0, 45, "legacy default: 45 days");
    assert_eq!(
        shape("period=hours&steps=1".into()).await?.0,
        2,
        "never fewer than 2 steps"
    );
    assert_eq!(shape("period=weeks&steps=0".into()).await?.0, 12);
    assert_eq!(shape("period=months".into()).await?.0, 12);

    // A send lands in the last (current) bucket of a legacy series.
    trigger_segment(&t, ASSIGNMENT_ALERT, "x").await?;
    let (_, body) = shape("period=hours&steps=3".into()).await?;
    let sent = body["metric"]["series"]["sent"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let expected = t
        .sim()
        .delivery_totals(&DeliveryFilter::broadcast(ASSIGNMENT_ALERT))
        .sent;
    assert_eq!(sent.last().and_then(Value::as_u64), Some(expected));
    Ok(())
}

#[tokio::test]
async fn bad_metrics_requests() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let base = format!("/v1/broadcasts/{ASSIGNMENT_ALERT}/metrics");
    for (query, parameter) in [
        ("version=2", "res"),
        ("version=2&res=minutes", "res"),
        ("version=2&res=days&tz=Nowhere/Land", "tz"),
        ("version=2&res=days&start=yesterday", "start"),
        (
            "version=2&res=days&start=1772539200&end=1772323200",
            "start",
        ),
        ("version=2&res=days&start=0&end=1772323200", "end"),
        ("period=fortnights", "period"),
        ("period=days&steps=-2", "steps"),
        ("version=2&res=days&type=carrier_pigeon", "type"),
    ] {
        let (status, body) = send(t.app(Method::GET, &format!("{base}?{query}"))).await?;
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(
            body["errors"][0]["source"]["parameter"], parameter,
            "{query}"
        );
    }
    for path in [
        "/v1/campaigns/3/metrics",
        "/v1/broadcasts/1/metrics",
        "/v1/campaigns/999/metrics",
        "/v1/newsletters/999/metrics",
        "/v1/newsletters/1/contents/999/metrics",
        "/v1/broadcasts/x/metrics",
    ] {
        assert_eq!(status_of(t.app(Method::GET, path)).await?, 404, "{path}");
    }
    Ok(())
}

/// People p1..p200 with emails, a broadcast to all of them.
async fn small_world(seed: u64) -> anyhow::Result<(TestSim, i64)> {
    let t = spawn(SimConfig {
        seed,
        ..empty_unlimited()
    })
    .await?;
    for i in 1..=200 {
        let mut attrs = serde_json::Map::new();
        attrs.insert("email".into(), json!(format!("p{i}@example.com")));
        t.sim().upsert_person(&format!("p{i}"), attrs);
    }
    let broadcast = t.sim().add_broadcast(NewBroadcast::new(
        "All",
        AudienceFilter::attribute_exists("email"),
    ))?;
    t.sim().set_trigger_interval(Duration::ZERO);
    Ok((t, broadcast))
}

#[tokio::test]
async fn rates_by_subject_and_data_drawn_reproducibly() -> anyhow::Result<()> {
    let (t, broadcast) = small_world(7).await?;
    t.sim()
        .set_rates(RatesKey::Subject("Everything".into()), DeliveryRates::all())?;
    t.sim()
        .set_rates(RatesKey::Subject("Nothing".into()), DeliveryRates::none())?;
    t.sim().set_rates(
        RatesKey::Data {
            field: "variation".into(),
            value: json!("b"),
        },
        DeliveryRates {
            bounce_rate: 1.0,
            ..DeliveryRates::none()
        },
    )?;
    assert!(
        t.sim()
            .set_rates(
                RatesKey::Campaign(1),
                DeliveryRates {
                    open_rate: 2.0,
                    ..DeliveryRates::none()
                }
            )
            .is_err()
    );

    let fire = |data: Value| {
        let t = &t;
        async move {
            let (status, body) = send(
                t.app(Method::POST, &format!("/v1/campaigns/{broadcast}/triggers"))
                    .json(&json!({"data": data})),
            )
            .await?;
            anyhow::ensure!(status == 200, "{body}");
            body["id"].as_i64().ok_or_else(|| anyhow::anyhow!("id"))
        }
    };
    let everything = fire(json!({"subject": "Everything"})).await?;
    let nothing = fire(json!({"subject": "Nothing"})).await?;
    let bounced = fire(json!({"subject": "Other", "variation": "b"})).await?;
    let default = fire(json!({"subject": "Other"})).await?;
    t.sim().advance(Duration::from_secs(30 * 24 * 3600));

    let totals = |id| t.sim().delivery_totals(&DeliveryFilter::trigger(id));
    let all = totals(everything);
    assert_eq!(
        (
            all.sent,
            all.delivered,
            all.human_opened,
            all.prefetch_opened,
            all.clicked,
            all.converted,
            all.unsubscribed
        ),
        (200, 200, 200, 200, 200, 200, 200)
    );
    let none = totals(nothing);
    assert_eq!(
        (
            none.sent,
            none.delivered,
            none.opened,
            none.clicked,
            none.bounced
        ),
        (200, 200, 0, 0, 0)
    );
    let b = totals(bounced);
    assert_eq!((b.sent, b.bounced, b.delivered), (200, 200, 0));
    let d = totals(default);
    assert!(
        d.bounced < 20 && d.human_opened > 40 && d.human_opened < 110,
        "{d:?}"
    );
    // Subject rules are per delivery: the ledger by subject agrees.
    assert_eq!(
        t.sim()
            .delivery_totals(&DeliveryFilter::all().with_subject("Everything")),
        all
    );

    // Same seed, same sends: the same outcomes at the same offsets; another seed differs.
    let outcomes = |t: &TestSim, trigger: i64| {
        t.sim()
            .deliveries(&DeliveryFilter::trigger(trigger))
            .into_iter()
            .map(|d| {
                let offsets: Vec<(DeliveryMetric, i64)> = d
                    .events
                    .iter()
                    .chain(d.scheduled.iter())
                    .map(|(m, at)| (*m, (*at - d.sent_at).num_milliseconds()))
                    .collect();
                (d.person_id, offsets)
            })
            .collect::<Vec<_>>()
    };
    let mut runs = Vec::new();
    for seed in [7, 7, 8] {
        let (t, broadcast) = small_world(seed).await?;
        let (status, body) = send(
            t.app(Method::POST, &format!("/v1/campaigns/{broadcast}/triggers"))
                .json(&json!({})),
        )
        .await?;
        anyhow::ensure!(status == 200, "{body}");
        runs.push(outcomes(&t, body["id"].as_i64().unwrap_or(0)));
    }
    assert_eq!(runs[0].len(), 200);
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[0], runs[2]);
    Ok(())
}
