//! Deliveries as messages: per campaign, broadcast, newsletter and person; metrics holding only
//! what happened; filters and paging.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, empty_unlimited, send, spawn, status_of};
use cio_sim::{AudienceFilter, DeliveryRates, NewBroadcast, NewCampaign, NewNewsletter, RatesKey};

fn people(t: &TestSim, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let id = format!("m{i:02}");
            let attrs = json!({"email": format!("{id}@example.com")});
            t.sim()
                .upsert_person(&id, attrs.as_object().cloned().unwrap_or_default());
            id
        })
        .collect()
}

async fn messages(t: &TestSim, path: &str) -> anyhow::Result<Value> {
    let (status, body) = send(t.app(Method::GET, path)).await?;
    anyhow::ensure!(status == 200, "{path}: {status} {body}");
    Ok(body)
}

fn metric_keys(message: &Value) -> Vec<String> {
    let mut keys: Vec<String> = message["metrics"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

#[tokio::test]
async fn newsletter_messages_show_only_what_happened() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let sim = t.sim();
    people(&t, 5);
    sim.set_default_rates(DeliveryRates {
        open_rate: 1.0,
        ..DeliveryRates::none()
    })?;
    let newsletter = sim.add_newsletter(NewNewsletter::new(
        "Weekly",
        "Markets up",
        "<p>hi</p>",
        AudienceFilter::attribute_exists("email"),
    ))?;
    sim.send_newsletter(newsletter)?;

    let body = messages(&t, &format!("/v1/newsletters/{newsletter}/messages")).await?;
    let list = body["messages"].as_array().cloned().unwrap_or_default();
    assert_eq!(list.len(), 5);
    assert_eq!(body["next"], "");
    let first = &list[0];
    assert_eq!(first["customer_id"], "m04", "newest first");
    assert_eq!(
        metric_keys(first),
        vec!["created", "sent"],
        "nothing else yet: {first}"
    );
    assert_eq!(first["recipient"], "m04@example.com");
    assert_eq!(first["subject"], "Markets up");
    assert_eq!(first["newsletter_id"], newsletter);
    assert!(first["content_id"].is_i64());
    assert_eq!(first["message_template_id"], first["content_id"]);
    assert_eq!(
        (
            &first["campaign_id"],
            &first["broadcast_id"],
            &first["action_id"]
        ),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert_eq!(first["customer_identifiers"]["email"], "m04@example.com");
    assert_eq!(first["type"], "email");
    assert_eq!(first["failure_message"], Value::Null);
    assert!(
        first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("sim-d"))
    );

    sim.advance(Duration::from_secs(8 * 24 * 3600));
    let body = messages(&t, &format!("/v1/newsletters/{newsletter}/messages")).await?;
    let first = &body["messages"][0];
    assert_eq!(
        metric_keys(first),
        vec!["created", "delivered", "opened", "sent"]
    );
    assert!(first["metrics"]["opened"].as_i64() >= first["metrics"]["delivered"].as_i64());

    // Filters.
    let opened = messages(
        &t,
        &format!("/v1/newsletters/{newsletter}/messages?metric=opened"),
    )
    .await?;
    assert_eq!(opened["messages"].as_array().map(Vec::len), Some(5));
    let clicked = messages(
        &t,
        &format!("/v1/newsletters/{newsletter}/messages?metric=clicked"),
    )
    .await?;
    assert_eq!(clicked["messages"], json!([]));
    let failed = messages(
        &t,
        &format!("/v1/newsletters/{newsletter}/messages?metric=failed"),
    )
    .await?;
    assert_eq!(failed["messages"], json!([]));
    for bad in [
        "metric=read",
        "limit=0",
        "limit=1001",
        "start=x",
        "type=fax",
    ] {
        let status = status_of(t.app(
            Method::GET,
            &format!("/v1/newsletters/{newsletter}/messages?{bad}"),
        ))
        .await?;
        assert_eq!(status, 400, "{bad}");
    }
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/newsletters/99/messages")).await?,
        404
    );
    Ok(())
}

#[tokio::test]
async fn broadcast_campaign_and_person_messages_page_newest_first() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let sim = t.sim();
    let ids = people(&t, 12);
    sim.set_rates(
        RatesKey::Subject("Bounce".into()),
        DeliveryRates {
            bounce_rate: 1.0,
            ..DeliveryRates::none()
        },
    )?;
    let broadcast = sim.add_broadcast(NewBroadcast::new(
        "Alert",
        AudienceFilter::attribute_exists("email"),
    ))?;
    sim.set_trigger_interval(Duration::ZERO);
    let (status, trigger) = send(
        t.app(Method::POST, &format!("/v1/campaigns/{broadcast}/triggers"))
            .json(&json!({"data": {"subject": "Bounce"}})),
    )
    .await?;
    assert_eq!(status, 200, "{trigger}");
    let campaign = sim.add_campaign(NewCampaign::new("Welcome"));
    let refs: Vec<&str> = ids.iter().map(String::as_str).take(3).collect();
    sim.record_campaign_send(campaign, &refs)?;
    sim.advance(Duration::from_secs(3600));

    // Broadcast: 12 deliveries, paged by 5.
    let mut seen = Vec::new();
    let mut start = String::new();
    loop {
        let body = messages(
            &t,
            &format!("/v1/broadcasts/{broadcast}/messages?limit=5&start={start}"),
        )
        .await?;
        for m in body["messages"].as_array().into_iter().flatten() {
            assert_eq!(m["broadcast_id"], broadcast);
            assert_eq!(m["campaign_id"], Value::Null);
            assert!(m["action_id"].is_i64());
            assert_eq!(m["subject"], "Bounce");
            assert!(m["metrics"]["bounced"].is_i64(), "{m}");
            assert!(m["metrics"].get("delivered").is_none());
            assert!(
                m["failure_message"]
                    .as_str()
                    .is_some_and(|f| f.starts_with("550"))
            );
            seen.push(m["customer_id"].as_str().unwrap_or_default().to_owned());
        }
        start = body["next"].as_str().unwrap_or_default().to_owned();
        if start.is_empty() {
            break;
        }
    }
    let mut expected: Vec<String> = ids.clone();
    expected.reverse();
    assert_eq!(seen, expected);
    let states = messages(
        &t,
        &format!("/v1/broadcasts/{broadcast}/messages?state=failed"),
    )
    .await?;
    assert_eq!(states["messages"], json!([]));
    let push = messages(
        &t,
        &format!("/v1/broadcasts/{broadcast}/messages?type=push"),
    )
    .await?;
    assert_eq!(push["messages"], json!([]));

    // Campaign route: campaigns only.
    let body = messages(&t, &format!("/v1/campaigns/{campaign}/messages")).await?;
    assert_eq!(body["messages"].as_array().map(Vec::len), Some(3));
    assert_eq!(body["messages"][0]["campaign_id"], campaign);
    assert_eq!(
        status_of(t.app(Method::GET, &format!("/v1/campaigns/{broadcast}/messages"))).await?,
        404
    );
    assert_eq!(
        status_of(t.app(Method::GET, &format!("/v1/broadcasts/{campaign}/messages"))).await?,
        404
    );

    // A person's messages: both sends, newest first; by email too.
    let body = messages(&t, "/v1/customers/m00/messages").await?;
    let parents: Vec<(Value, Value)> = body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m["campaign_id"].clone(), m["broadcast_id"].clone()))
        .collect();
    assert_eq!(
        parents,
        vec![
            (json!(campaign), Value::Null),
            (Value::Null, json!(broadcast))
        ]
    );
    let by_email = messages(
        &t,
        "/v1/customers/m00%40example.com/messages?id_type=email&limit=1",
    )
    .await?;
    assert_eq!(by_email["messages"].as_array().map(Vec::len), Some(1));
    assert!(!by_email["next"].as_str().unwrap_or_default().is_empty());
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/ghost/messages")).await?,
        404
    );
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/m00/messages?limit=1001")).await?,
        400
    );

    // A deleted person's deliveries stay, without a customer_id.
    assert!(sim.remove_person("m11"));
    let body = messages(&t, &format!("/v1/broadcasts/{broadcast}/messages?limit=1")).await?;
    let gone = &body["messages"][0];
    assert_eq!(gone["customer_id"], Value::Null);
    assert_eq!(gone["customer_identifiers"]["id"], "m11");
    assert_eq!(gone["recipient"], "m11@example.com");
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 12);
    Ok(())
}
