//! Newsletters: create (draft, send now, scheduled), send, reads, validation, lost responses.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, demo_unlimited, eligible, send, spawn, status_of, unix_now};
use cio_sim::{DeliveryFilter, Fault, SimApi};

const PREMIUM: i64 = 5;

fn newsletter(name: &str) -> Value {
    json!({
        "type": "email",
        "name": name,
        "recipients": {"segment": {"id": PREMIUM}},
        "subject": "Three dividend stocks for 2027",
        "body": "<html><body><p>Our picks.</p></body></html>",
        "from": "SharpSend Research <research@sharpsend.example>",
    })
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    if let Some(obj) = base.as_object_mut() {
        obj.insert(key.to_owned(), value);
    }
    base
}

fn without(mut base: Value, key: &str) -> Value {
    if let Some(obj) = base.as_object_mut() {
        obj.remove(key);
    }
    base
}

async fn create(t: &TestSim, body: &Value) -> anyhow::Result<(u16, Value)> {
    send(t.app(Method::POST, "/v1/newsletters").json(body)).await
}

fn premium_recipients(t: &TestSim) -> Vec<String> {
    eligible(
        t.sim(),
        &t.sim().segment_members(PREMIUM).unwrap_or_default(),
    )
}

#[tokio::test]
async fn create_a_draft_then_send_it() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = create(&t, &newsletter("Dividend picks [send:abc123]")).await?;
    assert_eq!(status, 200, "{body}");
    let n = &body["newsletter"];
    let id = n["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("id: {body}"))?;
    assert_eq!(id, 3, "after the two demo newsletters");
    assert_eq!(n["type"], "email");
    assert_eq!(n["name"], "Dividend picks [send:abc123]");
    assert!(n["sent_at"].is_null(), "a draft: {n}");
    assert_eq!(n["recipient_segment_ids"], json!([PREMIUM]));
    assert_eq!(n["tags"], json!([]));
    let content_id = n["content_ids"][0].as_i64().unwrap_or(0);
    assert!(content_id > 0);
    assert!(
        t.sim()
            .deliveries(&DeliveryFilter::newsletter(id))
            .is_empty()
    );

    // Findable by its name in the list.
    let (_, list) = send(t.app(Method::GET, "/v1/newsletters")).await?;
    let found: Vec<i64> = list["newsletters"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|n| {
                    n["name"]
                        .as_str()
                        .is_some_and(|s| s.contains("[send:abc123]"))
                })
                .filter_map(|n| n["id"].as_i64())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(found, [id]);

    let (status, sent) = send(t.app(Method::POST, &format!("/v1/newsletters/{id}/send"))).await?;
    assert_eq!(status, 200, "{sent}");
    let sent_at = sent["newsletter"]["sent_at"].as_i64().unwrap_or(0);
    assert!((unix_now() - sent_at).abs() <= 2);
    let deliveries = t.sim().deliveries(&DeliveryFilter::newsletter(id));
    let mut people: Vec<String> = deliveries.iter().map(|d| d.person_id.clone()).collect();
    people.sort();
    assert_eq!(people, premium_recipients(&t));
    assert!(
        deliveries
            .iter()
            .all(|d| d.subject == "Three dividend stocks for 2027"
                && d.content_id == Some(content_id))
    );
    assert_eq!(
        t.sim().newsletter(id).map(|n| n.recipients_count),
        Some(deliveries.len() as u64)
    );

    // Sending again: 400, nothing more sent.
    let (status, body) = send(t.app(Method::POST, &format!("/v1/newsletters/{id}/send"))).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        t.sim().deliveries(&DeliveryFilter::newsletter(id)).len(),
        deliveries.len()
    );

    // Reads.
    let (status, one) = send(t.app(Method::GET, &format!("/v1/newsletters/{id}"))).await?;
    assert_eq!(status, 200);
    assert_eq!(one["newsletter"]["sent_at"], sent_at);
    let (_, contents) = send(t.app(Method::GET, &format!("/v1/newsletters/{id}/contents"))).await?;
    assert_eq!(contents["contents"][0]["id"], content_id);
    assert_eq!(
        contents["contents"][0]["subject"],
        "Three dividend stocks for 2027"
    );
    assert_eq!(
        contents["contents"][0]["body"],
        "<html><body><p>Our picks.</p></body></html>"
    );
    assert_eq!(
        contents["contents"][0]["from"],
        "SharpSend Research <research@sharpsend.example>"
    );
    let (status, content) = send(t.app(
        Method::GET,
        &format!("/v1/newsletters/{id}/contents/{content_id}"),
    ))
    .await?;
    assert_eq!(
        (status, &content["content"]),
        (200, &contents["contents"][0])
    );
    for missing in [
        format!("/v1/newsletters/{id}/contents/{}", content_id + 100),
        "/v1/newsletters/999".to_owned(),
        "/v1/newsletters/abc".to_owned(),
        "/v1/newsletters/999/contents".to_owned(),
    ] {
        assert_eq!(
            status_of(t.app(Method::GET, &missing)).await?,
            404,
            "{missing}"
        );
    }
    assert_eq!(
        status_of(t.app(Method::POST, "/v1/newsletters/999/send")).await?,
        404
    );
    Ok(())
}

#[tokio::test]
async fn send_now_and_scheduled() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = create(&t, &with(newsletter("now"), "send_now", json!(true))).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["newsletter"]["sent_at"].is_i64());
    let id = body["newsletter"]["id"].as_i64().unwrap_or(0);
    assert_eq!(
        t.sim().deliveries(&DeliveryFilter::newsletter(id)).len(),
        premium_recipients(&t).len()
    );

    let at = unix_now() + 3600;
    let (status, body) = create(&t, &with(newsletter("later"), "scheduled_at", json!(at))).await?;
    assert_eq!(status, 200, "{body}");
    let later = body["newsletter"]["id"].as_i64().unwrap_or(0);
    assert!(body["newsletter"]["sent_at"].is_null());
    // Scheduled is not a draft.
    assert_eq!(
        status_of(t.app(Method::POST, &format!("/v1/newsletters/{later}/send"))).await?,
        400
    );
    t.sim().advance(Duration::from_secs(3500));
    assert!(
        t.sim()
            .newsletter(later)
            .is_some_and(|n| n.sent_at.is_none())
    );
    t.sim().advance(Duration::from_secs(200));
    let (_, one) = send(t.app(Method::GET, &format!("/v1/newsletters/{later}"))).await?;
    let sent_at = one["newsletter"]["sent_at"].as_i64().unwrap_or(0);
    // It went at its time, which now looks 100 s ago.
    assert!((unix_now() - 100 - sent_at).abs() <= 2, "{one}");
    assert_eq!(
        t.sim().deliveries(&DeliveryFilter::newsletter(later)).len(),
        premium_recipients(&t).len()
    );

    // Schedule endpoint on a draft.
    let (_, draft) = create(&t, &newsletter("draft")).await?;
    let draft = draft["newsletter"]["id"].as_i64().unwrap_or(0);
    let path = format!("/v1/newsletters/{draft}/schedule");
    assert_eq!(
        status_of(
            t.app(Method::POST, &path)
                .json(&json!({"scheduled_at": unix_now() - 5}))
        )
        .await?,
        400
    );
    assert_eq!(
        status_of(t.app(Method::POST, &path).json(&json!({}))).await?,
        400
    );
    assert_eq!(
        status_of(
            t.app(Method::POST, &path)
                .json(&json!({"scheduled_at": unix_now() + 60}))
        )
        .await?,
        200
    );
    assert_eq!(
        status_of(
            t.app(Method::POST, &path)
                .json(&json!({"scheduled_at": unix_now() + 90}))
        )
        .await?,
        400
    );
    t.sim().advance(Duration::from_secs(61));
    assert!(
        t.sim()
            .newsletter(draft)
            .is_some_and(|n| n.sent_at.is_some())
    );
    Ok(())
}

#[tokio::test]
async fn invalid_creates_are_refused() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let before = t.sim().newsletters().len();
    let base = newsletter("valid");
    let cases = [
        (without(base.clone(), "subject"), "/subject"),
        (with(base.clone(), "subject", json!("   ")), "/subject"),
        (without(base.clone(), "body"), "/body"),
        (without(base.clone(), "name"), "/name"),
        (with(base.clone(), "name", json!("n".repeat(191))), "/name"),
        (without(base.clone(), "type"), "/type"),
        (with(base.clone(), "type", json!("twilio")), "/type"),
        (without(base.clone(), "recipients"), "/recipients"),
        (with(base.clone(), "recipients", json!({})), "/recipients"),
        (
            with(base.clone(), "recipients", json!({"or": []})),
            "/recipients/or",
        ),
        (
            with(base.clone(), "recipients", json!({"segment": {"id": 999}})),
            "/recipients",
        ),
        (with(base.clone(), "from_id", json!(1)), "/from_id"),
        (
            with(without(base.clone(), "from"), "from_id", json!(0)),
            "/from_id",
        ),
        (with(base.clone(), "from", json!("nobody")), "/from"),
        (
            with(
                with(base.clone(), "send_now", json!(true)),
                "scheduled_at",
                json!(unix_now() + 60),
            ),
            "/scheduled_at",
        ),
        (
            with(base.clone(), "scheduled_at", json!(unix_now() - 60)),
            "/scheduled_at",
        ),
        (with(base.clone(), "send_now", json!("yes")), "/send_now"),
        (
            with(base.clone(), "rate_limit_email_rate", json!(100)),
            "/rate_limit_email_rate",
        ),
        (
            with(
                with(base.clone(), "rate_limit_email_rate", json!(100)),
                "rate_limit_time_period",
                json!(30),
            ),
            "/rate_limit_time_period",
        ),
    ];
    for (body, pointer) in cases {
        let (status, answer) = create(&t, &body).await?;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(
            answer["errors"][0]["source"]["pointer"], pointer,
            "{body}: {answer}"
        );
    }
    assert_eq!(
        status_of(t.app(Method::POST, "/v1/newsletters").body("not json")).await?,
        400
    );
    let huge = with(base.clone(), "body", json!("x".repeat(1024 * 1024)));
    assert_eq!(create(&t, &huge).await?.0, 413);
    assert_eq!(t.sim().newsletters().len(), before, "nothing created");

    // The optional extras are accepted.
    let extras = with(
        with(
            with(base, "rate_limit_email_rate", json!(500)),
            "rate_limit_time_period",
            json!(3600),
        ),
        "preheader_text",
        json!("preview"),
    );
    assert_eq!(create(&t, &extras).await?.0, 200);
    Ok(())
}

#[tokio::test]
async fn lists_sort_and_page() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    for name in ["a", "b", "c"] {
        assert_eq!(create(&t, &newsletter(name)).await?.0, 200);
    }
    let ids = |body: &Value| -> Vec<i64> {
        body["newsletters"]
            .as_array()
            .map(|a| a.iter().filter_map(|n| n["id"].as_i64()).collect())
            .unwrap_or_default()
    };
    let (_, all) = send(t.app(Method::GET, "/v1/newsletters")).await?;
    assert_eq!(ids(&all), [1, 2, 3, 4, 5]);
    assert_eq!(all["next"], "");
    assert!(
        all["newsletters"][0]["sent_at"].is_i64(),
        "the demo wrap was sent"
    );
    assert!(
        all["newsletters"][1]["sent_at"].is_null(),
        "the demo special is a draft"
    );
    let (_, desc) = send(t.app(Method::GET, "/v1/newsletters?sort=desc&limit=2")).await?;
    assert_eq!(ids(&desc), [5, 4]);
    let next = desc["next"].as_str().unwrap_or_default().to_owned();
    let (_, page2) = send(t.app(
        Method::GET,
        &format!("/v1/newsletters?sort=desc&limit=2&start={next}"),
    ))
    .await?;
    assert_eq!(ids(&page2), [3, 2]);
    let next = page2["next"].as_str().unwrap_or_default().to_owned();
    let (_, page3) = send(t.app(
        Method::GET,
        &format!("/v1/newsletters?sort=desc&limit=2&start={next}"),
    ))
    .await?;
    assert_eq!((ids(&page3), page3["next"].clone()), (vec![1], json!("")));
    for bad in ["sort=up", "limit=0", "limit=1001", "start=!!"] {
        assert_eq!(
            status_of(t.app(Method::GET, &format!("/v1/newsletters?{bad}"))).await?,
            400,
            "{bad}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn accept_then_drop_on_create_and_send() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    t.sim()
        .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
    let lost = t
        .app(Method::POST, "/v1/newsletters")
        .json(&newsletter("Lost create [send:zz9]"))
        .send()
        .await;
    assert!(lost.is_err(), "no response");
    let created: Vec<i64> = t
        .sim()
        .newsletters()
        .into_iter()
        .filter(|n| n.name == "Lost create [send:zz9]")
        .map(|n| n.id)
        .collect();
    assert_eq!(created.len(), 1, "created exactly once");
    let id = created[0];

    t.sim()
        .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
    let lost = t
        .app(Method::POST, &format!("/v1/newsletters/{id}/send"))
        .send()
        .await;
    assert!(lost.is_err(), "no response");
    let (_, one) = send(t.app(Method::GET, &format!("/v1/newsletters/{id}"))).await?;
    assert!(
        one["newsletter"]["sent_at"].is_i64(),
        "sent although the answer was lost"
    );
    let delivered = t.sim().deliveries(&DeliveryFilter::newsletter(id)).len();
    assert_eq!(delivered, premium_recipients(&t).len());
    // A retry is refused; nothing is sent twice.
    assert_eq!(
        status_of(t.app(Method::POST, &format!("/v1/newsletters/{id}/send"))).await?,
        400
    );
    assert_eq!(
        t.sim().deliveries(&DeliveryFilter::newsletter(id)).len(),
        delivered
    );
    Ok(())
}

#[tokio::test]
async fn the_subscription_center_requires_a_topic() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let before = t.sim().newsletters().len();
    assert_eq!(
        create(&t, &newsletter("no topic, center off")).await?.0,
        200
    );

    let (status, settings) = send(
        t.control(Method::POST, "/_sim/workspace")
            .json(&json!({"subscription_center": true})),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        settings,
        json!({"region": "us", "endpoint_region": "us", "subscription_center": true})
    );
    assert!(t.sim().subscription_center());

    let (status, body) = create(&t, &newsletter("no topic, center on")).await?;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"errors": [{"detail": "subscription_topic_id is required"}]})
    );
    assert_eq!(t.sim().newsletters().len(), before + 1);
    // Other faults are still reported first.
    let (status, body) = create(&t, &without(newsletter("no subject"), "subject")).await?;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["source"]["pointer"], "/subject");

    let with_topic = with(newsletter("topic 4"), "subscription_topic_id", json!(4));
    let (status, body) = create(&t, &with_topic).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["newsletter"]["subscription_topic_id"], 4);
    let bad_topic = with(newsletter("topic 0"), "subscription_topic_id", json!(0));
    assert_eq!(create(&t, &bad_topic).await?.0, 400);

    t.sim().set_subscription_center(false);
    assert_eq!(create(&t, &newsletter("off again")).await?.0, 200);
    assert_eq!(t.sim().newsletters().len(), before + 3);
    Ok(())
}
