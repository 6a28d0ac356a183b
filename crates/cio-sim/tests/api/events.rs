//! Track API v1 events (person and anonymous), delete, suppress/unsuppress, merge.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, empty_unlimited, send, spawn, status_of};

/// A valid ULID made of digits: `01J` + 23 digits.
pub fn ulid(n: u64) -> String {
    format!("01J{n:023}")
}

fn event(t: &TestSim, identifier: &str, body: Value) -> reqwest::RequestBuilder {
    t.track(
        Method::POST,
        &format!("/api/v1/customers/{identifier}/events"),
    )
    .json(&body)
}

fn identify(t: &TestSim, identifier: &str, body: Value) -> reqwest::RequestBuilder {
    t.track(Method::PUT, &format!("/api/v1/customers/{identifier}"))
        .json(&body)
}

#[tokio::test]
async fn v1_event_is_recorded_for_the_person() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    assert_eq!(
        status_of(identify(&t, "u1", json!({"plan": "pro"}))).await?,
        200
    );
    let (status, body) = send(event(
        &t,
        "u1",
        json!({
            "name": " newsletter_opened ",
            "data": {"issue": 42, "tags": ["macro"]},
            "timestamp": 1_767_225_600,
            "type": "event",
            "id": ulid(1).to_lowercase(),
        }),
    ))
    .await?;
    assert_eq!((status, body), (200, json!({})));

    let events = t.sim().events_for("u1");
    assert_eq!(events.len(), 1, "{events:?}");
    let e = &events[0];
    assert_eq!(e.person_id.as_deref(), Some("u1"));
    assert_eq!(e.anonymous_id, None);
    assert_eq!(e.name, "newsletter_opened", "the name is trimmed");
    assert_eq!(
        e.id.as_deref(),
        Some(ulid(1).as_str()),
        "ids are upper-cased"
    );
    assert_eq!(e.timestamp, Some(1_767_225_600));
    assert_eq!(e.data, json!({"issue": 42, "tags": ["macro"]}));
    assert_eq!(t.sim().event_count(), 1);
    assert_eq!(t.sim().events(), events);
    // Also found by email and cio_id, and not under anyone else.
    let cio = t.sim().person("u1").map(|p| p.cio_id).unwrap_or_default();
    assert_eq!(t.sim().events_for(&format!("cio_{cio}")).len(), 1);
    assert!(t.sim().events_for("u2").is_empty());

    // A page view with no data and no timestamp.
    let (status, _) = send(event(&t, "u1", json!({"name": "/pricing", "type": "page"}))).await?;
    assert_eq!(status, 200);
    let events = t.sim().events_for("u1");
    assert_eq!(events.len(), 2);
    assert_eq!((events[1].timestamp, &events[1].data), (None, &json!({})));
    Ok(())
}

#[tokio::test]
async fn duplicate_event_id_is_dropped() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let body = json!({"name": "purchase", "id": ulid(7), "data": {"n": 1}});
    assert_eq!(send(event(&t, "u1", body.clone())).await?, (200, json!({})));
    // Same id again, even with other data, for another person, or lower-cased: 200, dropped.
    assert_eq!(send(event(&t, "u1", body.clone())).await?, (200, json!({})));
    let other = json!({"name": "other", "id": ulid(7).to_lowercase(), "data": {"n": 2}});
    assert_eq!(status_of(event(&t, "u2", other)).await?, 200);
    assert_eq!(t.sim().event_count(), 1);
    assert_eq!(t.sim().duplicate_events_dropped(), 2);
    assert_eq!(t.sim().events()[0].data, json!({"n": 1}));
    assert!(
        t.sim().person("u2").is_none(),
        "a dropped duplicate creates nobody"
    );

    // Events without an id are never deduplicated.
    for _ in 0..2 {
        assert_eq!(
            status_of(event(&t, "u1", json!({"name": "tick"}))).await?,
            200
        );
    }
    assert_eq!(t.sim().event_count(), 3);
    assert_eq!(t.sim().duplicate_events_dropped(), 2);
    Ok(())
}

#[tokio::test]
async fn event_limits_are_enforced() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let rejected = |body: Value| async {
        let (status, reply) = send(event(&t, "u1", body)).await?;
        anyhow::ensure!(status == 400, "expected 400, got {status}: {reply}");
        anyhow::ensure!(
            reply["meta"]["errors"][0].is_string(),
            "v1 error shape: {reply}"
        );
        Ok::<_, anyhow::Error>(reply)
    };

    rejected(json!({"name": "n".repeat(101)})).await?;
    assert_eq!(
        status_of(event(&t, "u1", json!({"name": "n".repeat(100)}))).await?,
        200
    );
    // 100 bytes counted after trimming; multi-byte characters count as bytes.
    let padded = format!("  {}  ", "n".repeat(100));
    assert_eq!(
        status_of(event(&t, "u1", json!({ "name": padded }))).await?,
        200
    );
    rejected(json!({"name": "é".repeat(51)})).await?;

    // data: serialized size at most 100,000 bytes. {"blob":"..."} adds 11 bytes.
    let data_of = |len: usize| json!({"name": "big", "data": {"blob": "x".repeat(len)}});
    assert_eq!(
        status_of(event(&t, "u1", data_of(100_000 - 11))).await?,
        200
    );
    rejected(data_of(100_000 - 10)).await?;

    rejected(json!({})).await?;
    rejected(json!({"name": "   "})).await?;
    rejected(json!({"name": 5})).await?;
    rejected(json!({"name": "x", "data": [1, 2]})).await?;
    rejected(json!({"name": "x", "data": "text"})).await?;
    rejected(json!({"name": "x", "type": "click"})).await?;
    rejected(json!({"name": "x", "timestamp": "2026-01-01"})).await?;
    rejected(json!({"name": "x", "timestamp": 1.5})).await?;
    rejected(json!({"name": "x", "id": "order-42"})).await?;
    rejected(json!({"name": "x", "id": "8ZZZZZZZZZZZZZZZZZZZZZZZZZ"})).await?;
    let all = rejected(json!({"name": "", "type": "x", "id": 1})).await?;
    assert_eq!(
        all["meta"]["errors"].as_array().map(Vec::len),
        Some(3),
        "{all}"
    );
    // Invalid JSON, empty body, over-long identifier.
    let (status, _) = send(
        t.track(Method::POST, "/api/v1/customers/u1/events")
            .header("content-type", "application/json")
            .body("{nope"),
    )
    .await?;
    assert_eq!(status, 400);
    assert_eq!(
        status_of(t.track(Method::POST, "/api/v1/customers/u1/events")).await?,
        400
    );
    let long = "i".repeat(151);
    assert_eq!(
        status_of(event(&t, &long, json!({"name": "x"}))).await?,
        400
    );

    assert_eq!(t.sim().event_count(), 3, "rejected events are not recorded");
    Ok(())
}

#[tokio::test]
async fn event_for_unknown_person_creates_them() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    assert_eq!(
        status_of(event(&t, "new-1", json!({"name": "signup"}))).await?,
        200
    );
    let p = t.sim().person("new-1");
    assert!(p.as_ref().is_some_and(|p| p.attributes.is_empty()), "{p:?}");

    assert_eq!(
        status_of(event(&t, "lead%40example.com", json!({"name": "signup"}))).await?,
        200
    );
    let lead = t
        .sim()
        .person_by_email("lead@example.com")
        .ok_or_else(|| anyhow::anyhow!("lead not created"))?;
    assert!(lead.id.is_none());
    let lead_events = t.sim().events_for("LEAD@example.com");
    assert_eq!(lead_events.len(), 1);
    assert_eq!(
        lead_events[0].person_id,
        Some(format!("cio_{}", lead.cio_id)),
        "id-less people appear as cio_<cio_id>"
    );

    // An unknown cio_id creates nobody and records nothing.
    assert_eq!(
        status_of(event(&t, "cio_ffffffff", json!({"name": "x"}))).await?,
        200
    );
    assert_eq!(t.sim().people_count(), 2);
    assert_eq!(t.sim().event_count(), 2);
    Ok(())
}

#[tokio::test]
async fn anonymous_events() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let anon = |body: Value| t.track(Method::POST, "/api/v1/events").json(&body);
    let (status, body) = send(anon(json!({
        "name": "watched_video",
        "anonymous_id": "cookie-1",
        "data": {"video": "intro"},
        "id": ulid(3),
    })))
    .await?;
    assert_eq!((status, body), (200, json!({})));
    // Without an anonymous id (an "invite" event) it is still recorded.
    assert_eq!(
        status_of(anon(
            json!({"name": "invite", "data": {"recipient": "a@b.co"}})
        ))
        .await?,
        200
    );
    // The same event id is dropped, here as well.
    assert_eq!(
        status_of(anon(json!({"name": "again", "id": ulid(3)}))).await?,
        200
    );

    let events = t.sim().events();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].person_id, None);
    assert_eq!(events[0].anonymous_id.as_deref(), Some("cookie-1"));
    assert_eq!(events[0].data, json!({"video": "intro"}));
    assert_eq!(events[1].anonymous_id, None);
    assert_eq!(t.sim().duplicate_events_dropped(), 1);
    assert_eq!(t.sim().people_count(), 0);

    assert_eq!(status_of(anon(json!({"anonymous_id": "c"}))).await?, 400);
    assert_eq!(
        status_of(anon(json!({"name": "x", "anonymous_id": 5}))).await?,
        400
    );
    assert_eq!(
        status_of(anon(json!({"name": "x", "type": "view"}))).await?,
        400
    );
    assert_eq!(t.sim().event_count(), 2);
    Ok(())
}

#[tokio::test]
async fn delete_removes_the_person_and_their_events() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    assert_eq!(
        status_of(identify(&t, "u1", json!({"email": "u1@e.com"}))).await?,
        200
    );
    assert_eq!(
        status_of(event(&t, "u1", json!({"name": "a", "id": ulid(9)}))).await?,
        200
    );
    assert_eq!(status_of(event(&t, "u2", json!({"name": "b"}))).await?, 200);
    let seg = t.sim().create_manual_segment("list", "");
    t.sim().add_to_manual_segment(seg, &["u1", "u2"])?;

    let (status, body) = send(t.track(Method::DELETE, "/api/v1/customers/u1")).await?;
    assert_eq!((status, body), (200, json!({})));
    assert!(t.sim().person("u1").is_none());
    assert!(t.sim().person_by_email("u1@e.com").is_none());
    assert_eq!(t.sim().event_count(), 1);
    assert_eq!(t.sim().segment_members(seg), Some(vec!["u2".to_owned()]));
    // Deleting someone unknown is fine; a deleted person's event id stays seen.
    assert_eq!(
        status_of(t.track(Method::DELETE, "/api/v1/customers/u1")).await?,
        200
    );
    assert_eq!(
        status_of(event(&t, "u1", json!({"name": "a", "id": ulid(9)}))).await?,
        200
    );
    assert!(t.sim().person("u1").is_none());
    assert_eq!(t.sim().duplicate_events_dropped(), 1);
    // Identify recreates (Customer.io's note on deletes).
    assert_eq!(status_of(identify(&t, "u1", json!({}))).await?, 200);
    assert!(t.sim().person("u1").is_some());
    Ok(())
}

#[tokio::test]
async fn suppressed_identifiers_are_ignored_until_unsuppressed() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    assert_eq!(
        status_of(identify(
            &t,
            "u1",
            json!({"email": "u1@e.com", "plan": "pro"})
        ))
        .await?,
        200
    );
    let (status, body) = send(t.track(Method::POST, "/api/v1/customers/u1/suppress")).await?;
    assert_eq!((status, body), (200, json!({})));
    assert!(
        t.sim().person("u1").is_none(),
        "suppress deletes the profile"
    );

    // Both the id and the email are suppressed: identify and events are ignored.
    assert_eq!(status_of(identify(&t, "u1", json!({"a": 1}))).await?, 200);
    assert_eq!(
        status_of(identify(&t, "U1%40e.com", json!({"a": 1}))).await?,
        200
    );
    assert_eq!(
        status_of(identify(&t, "u9", json!({"email": "u1@e.com"}))).await?,
        200
    );
    assert_eq!(status_of(event(&t, "u1", json!({"name": "x"}))).await?, 200);
    assert_eq!((t.sim().people_count(), t.sim().event_count()), (0, 0));

    // Unsuppressing the email releases the id too; the profile is not restored.
    assert_eq!(
        status_of(t.track(Method::POST, "/api/v1/customers/u1%40e.com/unsuppress")).await?,
        200
    );
    assert_eq!(status_of(identify(&t, "u1", json!({"a": 1}))).await?, 200);
    let p = t
        .sim()
        .person("u1")
        .ok_or_else(|| anyhow::anyhow!("u1 not recreated"))?;
    assert_eq!(p.attributes.get("plan"), None);
    assert_eq!(p.attributes.get("a"), Some(&json!(1)));
    Ok(())
}

#[tokio::test]
async fn merge_customers_v1() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    assert_eq!(
        status_of(identify(&t, "p", json!({"plan": "pro", "city": ""}))).await?,
        200
    );
    assert_eq!(
        status_of(identify(
            &t,
            "s%40e.com",
            json!({"plan": "free", "city": "Oslo", "age": 40})
        ))
        .await?,
        200
    );
    assert_eq!(
        status_of(event(&t, "s%40e.com", json!({"name": "e1"}))).await?,
        200
    );
    let merge = |body: Value| t.track(Method::POST, "/api/v1/merge_customers").json(&body);

    let (status, body) = send(merge(json!({
        "primary": {"id": "p"},
        "secondary": {"id": "p", "email": "s@e.com"},
    })))
    .await?;
    assert_eq!(status, 400);
    assert!(body["meta"]["error"].is_string(), "{body}");
    assert_eq!(
        status_of(merge(json!({"primary": {"id": "p"}}))).await?,
        400
    );

    // Unknown primary: nothing happens.
    assert_eq!(
        status_of(merge(
            json!({"primary": {"id": "nobody"}, "secondary": {"email": "s@e.com"}})
        ))
        .await?,
        200
    );
    assert_eq!(t.sim().people_count(), 2);

    let (status, body) = send(merge(
        json!({"primary": {"id": "p"}, "secondary": {"email": "s@e.com"}}),
    ))
    .await?;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(t.sim().people_count(), 1);
    let p = t
        .sim()
        .person("p")
        .ok_or_else(|| anyhow::anyhow!("primary gone"))?;
    assert_eq!(p.attributes["plan"], "pro", "the primary's attributes win");
    assert_eq!(p.attributes["city"], "Oslo", "empty on the primary: taken");
    assert_eq!(p.attributes["age"], 40);
    assert_eq!(p.email.as_deref(), Some("s@e.com"));
    let events = t.sim().events_for("p");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].person_id.as_deref(), Some("p"));
    Ok(())
}
