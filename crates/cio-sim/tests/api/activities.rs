//! The activity feed: attribute changes from every source, events, delivery activities;
//! filters, newest-first cursor paging, the 30-day window.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, demo_unlimited, empty_unlimited, send, spawn, status_of};
use cio_sim::{AudienceFilter, DeliveryRates, NewNewsletter};

async fn feed(t: &TestSim, query: &str) -> anyhow::Result<Value> {
    let (status, body) = send(t.app(Method::GET, &format!("/v1/activities{query}"))).await?;
    anyhow::ensure!(status == 200, "{status} {body}");
    Ok(body)
}

fn changes(body: &Value) -> Vec<(String, String, String, String)> {
    body["activities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["type"] == "attribute_change")
        .map(|a| {
            let name = a["name"].as_str().unwrap_or_default().to_owned();
            let change = &a["data"][&name];
            (
                a["customer_identifiers"]["id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                name,
                change["from"].as_str().unwrap_or("?").to_owned(),
                change["to"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

fn row(id: &str, name: &str, from: &str, to: &str) -> (String, String, String, String) {
    (id.into(), name.into(), from.into(), to.into())
}

#[tokio::test]
async fn every_source_of_attribute_changes_is_in_the_feed() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    // Track v1 identify creates the person: every attribute is a change from nothing.
    let status = status_of(
        t.track(Method::PUT, "/api/v1/customers/u1")
            .json(&json!({"email": "u1@example.com", "plan": "free", "score": 10})),
    )
    .await?;
    assert_eq!(status, 200);
    // Track v2 identify changes one attribute and sets another to the same text.
    let status = status_of(t.track(Method::POST, "/api/v2/entity").json(&json!({
        "type": "person", "identifiers": {"id": "u1"}, "action": "identify",
        "attributes": {"plan": "pro", "score": "10"}
    })))
    .await?;
    assert_eq!(status, 200);
    // Another system (a form fill) changes and removes attributes.
    let (status, person) = send(
        t.control(Method::POST, "/_sim/people/u1@example.com/attributes")
            .json(&json!({"plan": "premium", "score": null, "source": "typeform"})),
    )
    .await?;
    assert_eq!(status, 200, "{person}");
    assert_eq!(person["person"]["attributes"]["plan"], "premium");
    assert_eq!(
        status_of(
            t.control(Method::POST, "/_sim/people/nobody/attributes")
                .json(&json!({"a": 1}))
        )
        .await?,
        404
    );
    assert!(
        t.sim().person("nobody").is_none(),
        "a form fill creates nobody"
    );

    let body = feed(&t, "?limit=100").await?;
    let mut got = changes(&body);
    got.reverse(); // oldest first, to read the story
    assert_eq!(
        got,
        vec![
            row("u1", "id", "", "u1"),
            row("u1", "email", "", "u1@example.com"),
            row("u1", "plan", "", "free"),
            row("u1", "score", "", "10"),
            row("u1", "plan", "free", "pro"),
            row("u1", "plan", "pro", "premium"),
            row("u1", "score", "10", ""),
            row("u1", "source", "", "typeform"),
        ]
    );
    let first = &body["activities"][0];
    assert_eq!(first["customer_id"], "u1");
    assert_eq!(first["customer_identifiers"]["email"], "u1@example.com");
    assert!(first["customer_identifiers"]["cio_id"].is_string());
    assert_eq!(first["delivery_id"], Value::Null);
    assert!(first["timestamp"].as_i64() > Some(1_700_000_000));
    assert_eq!(first["id"].as_str().map(str::len), Some(26), "a ULID");

    // Filters: by name, by type, by person (id_type too), and the customer route.
    let plans = changes(&feed(&t, "?type=attribute_change&name=plan").await?);
    assert_eq!(plans.len(), 3);
    assert!(plans.iter().all(|c| c.1 == "plan"));
    t.sim().upsert_person("u2", serde_json::Map::new());
    let by_email = feed(&t, "?customer_id=u1%40example.com&id_type=email&limit=100").await?;
    assert_eq!(changes(&by_email).len(), 8);
    let (status, own) = send(t.app(Method::GET, "/v1/customers/u2/activities")).await?;
    assert_eq!(status, 200);
    assert_eq!(changes(&own), vec![row("u2", "id", "", "u2")]);
    let unknown = feed(&t, "?customer_id=ghost").await?;
    assert_eq!(unknown, json!({"activities": [], "next": ""}));
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/ghost/activities")).await?,
        404
    );
    // The simulator's own view agrees.
    assert_eq!(t.sim().activities(Some("u1")).len(), 8);
    let (_, control) = send(t.control(Method::GET, "/_sim/activities?person=u2")).await?;
    assert_eq!(control["activities"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[tokio::test]
async fn events_and_deliveries_are_activities() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let sim = t.sim();
    for id in ["r1", "r2"] {
        let attrs = json!({"email": format!("{id}@example.com")});
        sim.upsert_person(id, attrs.as_object().cloned().unwrap_or_default());
    }
    let status = status_of(
        t.track(Method::POST, "/api/v1/customers/r1/events")
            .json(&json!({"name": "signed_up", "data": {"plan": "pro"}})),
    )
    .await?;
    assert_eq!(status, 200);
    sim.set_default_rates(DeliveryRates {
        open_rate: 1.0,
        click_rate: 1.0,
        ..DeliveryRates::none()
    })?;
    let newsletter = sim.add_newsletter(NewNewsletter::new(
        "Weekly",
        "Hello",
        "<p>hi</p>",
        AudienceFilter::attribute_exists("email"),
    ))?;
    sim.send_newsletter(newsletter)?;
    sim.advance(Duration::from_secs(8 * 24 * 3600));

    let events = feed(&t, "?type=event").await?;
    assert_eq!(events["activities"][0]["name"], "signed_up");
    assert_eq!(events["activities"][0]["data"], json!({"plan": "pro"}));
    let body = feed(&t, "?customer_id=r1&limit=100").await?;
    let kinds: Vec<&str> = body["activities"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["type"].as_str())
        .filter(|k| k.ends_with("_email"))
        .collect();
    assert_eq!(
        kinds,
        vec![
            "clicked_email",
            "opened_email",
            "delivered_email",
            "sent_email"
        ],
        "newest first"
    );
    let opened = feed(&t, "?type=opened_email").await?;
    let activity = &opened["activities"][0];
    let delivery = activity["delivery_id"].as_str().unwrap_or_default();
    assert!(delivery.starts_with("sim-d"), "{activity}");
    assert_eq!(activity["delivery_type"], "email");
    assert_eq!(activity["data"]["delivery_id"], delivery);
    assert_eq!(activity["data"]["opened"], true);
    assert!(activity["data"]["delivered"].is_i64());
    assert_eq!(opened["activities"].as_array().map(Vec::len), Some(2));
    // A name filter matches attributes and events only.
    let named = feed(&t, "?name=signed_up").await?;
    assert_eq!(named["activities"].as_array().map(Vec::len), Some(1));
    Ok(())
}

#[tokio::test]
async fn pages_newest_first_without_gaps_and_refuses_bad_parameters() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    for i in 0..25 {
        let attrs = json!({"n": i});
        t.sim()
            .upsert_person("p", attrs.as_object().cloned().unwrap_or_default());
    }
    // 1 id change + 25 value changes.
    let mut seen = Vec::new();
    let mut start = String::new();
    let mut pages = 0;
    loop {
        let body = feed(&t, &format!("?limit=7&start={start}")).await?;
        pages += 1;
        let page = body["activities"].as_array().cloned().unwrap_or_default();
        assert!(page.len() <= 7);
        seen.extend(
            page.iter()
                .map(|a| a["id"].as_str().unwrap_or("").to_owned()),
        );
        // New activities arriving meanwhile land on top and do not disturb the paging.
        t.sim().change_attributes(
            "p",
            json!({"late": pages})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        start = body["next"].as_str().unwrap_or("").to_owned();
        if start.is_empty() {
            break;
        }
    }
    assert_eq!(seen.len(), 26);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 26);
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.reverse();
    assert_eq!(seen, sorted, "newest first: ids descend");
    assert_eq!(pages, 4);

    for bad in [
        "?limit=0",
        "?limit=101",
        "?limit=x",
        "?start=garbage",
        "?type=opened",
        "?id_type=phone",
        "?deleted=maybe",
    ] {
        let (status, body) = send(t.app(Method::GET, &format!("/v1/activities{bad}"))).await?;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/activities?limit=100")).await?,
        200
    );
    Ok(())
}

#[tokio::test]
async fn only_the_last_30_days_are_served() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    for i in 0..5 {
        let attrs = json!({"old": i});
        t.sim()
            .upsert_person("p", attrs.as_object().cloned().unwrap_or_default());
    }
    let first = feed(&t, "?limit=2").await?;
    let cursor = first["next"].as_str().unwrap_or_default().to_owned();
    assert!(!cursor.is_empty());
    t.sim().advance(Duration::from_secs(20 * 24 * 3600));
    t.sim().change_attributes(
        "p",
        json!({"recent": true})
            .as_object()
            .cloned()
            .unwrap_or_default(),
    );
    assert_eq!(changes(&feed(&t, "?limit=100").await?).len(), 7);
    t.sim().advance(Duration::from_secs(11 * 24 * 3600));
    let body = feed(&t, "?limit=100").await?;
    assert_eq!(
        changes(&body),
        vec![row("p", "recent", "", "true")],
        "older than 30 days: gone"
    );
    // A cursor from before now points past the window: an empty last page, not an error.
    let stale = feed(&t, &format!("?start={cursor}")).await?;
    assert_eq!(stale, json!({"activities": [], "next": ""}));
    Ok(())
}

#[tokio::test]
async fn the_demo_people_bring_no_activity() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let body = feed(&t, "?type=attribute_change").await?;
    assert_eq!(body["activities"], json!([]));
    Ok(())
}
