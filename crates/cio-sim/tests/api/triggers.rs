//! Campaigns, API-triggered broadcasts and triggers: lists, 404/422/429, recipients, status,
//! errors, accept-then-drop.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, demo_unlimited, eligible, retry_after, send, spawn, status_of};
use cio_sim::{
    AudienceFilter, CampaignKind, DeliveryFilter, Fault, NewBroadcast, SimApi, SimError,
    TriggerScope,
};

/// Demo ids (see the simulator's `demo` docs).
const ASSIGNMENT_ALERT: i64 = 3;
const BREAKING_NEWS: i64 = 4;
const DRAFT_BROADCAST: i64 = 5;
const HIGH_ENGAGEMENT: i64 = 4;

async fn trigger(t: &TestSim, broadcast: i64, body: Value) -> anyhow::Result<(u16, Value)> {
    send(
        t.app(Method::POST, &format!("/v1/campaigns/{broadcast}/triggers"))
            .json(&body),
    )
    .await
}

fn sorted(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids
}

#[tokio::test]
async fn lists_demo_campaigns_and_broadcasts() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = send(t.app(Method::GET, "/v1/campaigns")).await?;
    assert_eq!(status, 200);
    let campaigns = body["campaigns"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = campaigns
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["Welcome Series", "Win-back: Dormant Free Readers"]);
    for c in &campaigns {
        for field in [
            "id",
            "deduplicate_id",
            "type",
            "created",
            "updated",
            "active",
            "state",
            "actions",
            "tags",
        ] {
            assert!(!c[field].is_null(), "{field} missing in {c}");
        }
    }
    assert_eq!(campaigns[1]["type"], "segment");
    assert_eq!(campaigns[1]["trigger_segment_ids"], json!([8]));

    let (status, body) = send(t.app(Method::GET, "/v1/broadcasts")).await?;
    assert_eq!(status, 200);
    let broadcasts = body["broadcasts"].as_array().cloned().unwrap_or_default();
    let summary: Vec<(i64, &str, &str)> = broadcasts
        .iter()
        .map(|b| {
            (
                b["id"].as_i64().unwrap_or(0),
                b["name"].as_str().unwrap_or(""),
                b["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (ASSIGNMENT_ALERT, "Assignment Alert", "running"),
            (BREAKING_NEWS, "Breaking Market News", "running"),
            (DRAFT_BROADCAST, "Earnings Season Preview", "draft"),
        ]
    );
    assert_eq!(broadcasts[2]["active"], false);
    assert_eq!(broadcasts[0]["actions"][0]["type"], "email");

    let (status, body) = send(t.app(Method::GET, "/v1/broadcasts/3")).await?;
    assert_eq!((status, &body["broadcast"]), (200, &broadcasts[0]));
    let (status, body) = send(t.app(Method::GET, "/v1/campaigns/1")).await?;
    assert_eq!((status, &body["campaign"]), (200, &campaigns[0]));
    // Campaigns and broadcasts share ids but not endpoints.
    for missing in [
        "/v1/campaigns/3",
        "/v1/broadcasts/1",
        "/v1/campaigns/999",
        "/v1/broadcasts/abc",
    ] {
        let (status, body) = send(t.app(Method::GET, missing)).await?;
        assert_eq!(status, 404, "{missing}");
        assert_eq!(body["errors"][0]["status"], "404");
    }
    assert_eq!(t.sim().campaigns().len(), 5);
    assert_eq!(
        t.sim().campaign(ASSIGNMENT_ALERT).map(|c| c.kind),
        Some(CampaignKind::Broadcast)
    );
    Ok(())
}

#[tokio::test]
async fn recipients_filter_resolves_over_segments_and_attributes() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let body = json!({
        "recipients": {"and": [
            {"segment": {"id": HIGH_ENGAGEMENT}},
            {"attribute": {"field": "subscription_tier", "operator": "eq", "value": "pro"}}
        ]},
        "data": {"subject": "Buy the dip in semis", "send_id": "send-7"}
    });
    let (status, answer) = trigger(&t, ASSIGNMENT_ALERT, body.clone()).await?;
    assert_eq!(status, 200, "{answer}");
    let id = answer["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("integer id: {answer}"))?;

    let members = t.sim().segment_members(HIGH_ENGAGEMENT).unwrap_or_default();
    let pro: Vec<String> = members
        .into_iter()
        .filter(|m| {
            t.sim()
                .person(m)
                .is_some_and(|p| p.attributes.get("subscription_tier") == Some(&json!("pro")))
        })
        .collect();
    let expected = eligible(t.sim(), &pro);
    assert!(
        expected.len() > 50 && expected.len() < pro.len() + 1,
        "{}",
        expected.len()
    );
    let recorded = t
        .sim()
        .trigger(id)
        .ok_or_else(|| anyhow::anyhow!("trigger recorded"))?;
    assert_eq!(sorted(recorded.recipients.clone()), expected);
    assert_eq!(recorded.recipients_count, expected.len() as u64);
    assert_eq!(recorded.data, Some(body["data"].clone()));

    // Deliveries carry the data and take their subject from it.
    let deliveries = t.sim().deliveries(&DeliveryFilter::trigger(id));
    assert_eq!(deliveries.len(), expected.len());
    assert!(deliveries.iter().all(|d| {
        d.subject == "Buy the dip in semis"
            && d.broadcast_id == Some(ASSIGNMENT_ALERT)
            && d.data
                .as_ref()
                .is_some_and(|data| data["send_id"] == "send-7")
    }));

    // Status: flat, string id, the request echoed as recipients_filter.
    let (status, s) = send(t.app(
        Method::GET,
        &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers/{id}"),
    ))
    .await?;
    assert_eq!(status, 200);
    assert_eq!(s["id"], json!(id.to_string()));
    assert_eq!(s["broadcast_id"], ASSIGNMENT_ALERT);
    assert_eq!(s["recipients_count"], expected.len());
    assert_eq!(s["recipients_filter"], body);
    assert!(s["created_at"].as_i64().is_some_and(|c| c > 1_700_000_000));
    assert_eq!(s["processed_at"], s["created_at"]);
    assert_eq!(s["workflow_action_ids"].as_array().map(Vec::len), Some(1));

    // Listed under the broadcast, not under the other one.
    let (_, list) = send(t.app(
        Method::GET,
        &format!("/v1/broadcasts/{ASSIGNMENT_ALERT}/triggers"),
    ))
    .await?;
    assert_eq!(list["triggers"][0]["id"], id);
    assert_eq!(list["triggers"][0]["broadcast_id"], ASSIGNMENT_ALERT);
    let (_, other) = send(t.app(
        Method::GET,
        &format!("/v1/broadcasts/{BREAKING_NEWS}/triggers"),
    ))
    .await?;
    assert_eq!(other["triggers"], json!([]));
    assert_eq!(
        status_of(t.app(
            Method::GET,
            &format!("/v1/campaigns/{BREAKING_NEWS}/triggers/{id}")
        ))
        .await?,
        404
    );
    let (status, errors) = send(t.app(
        Method::GET,
        &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers/{id}/errors"),
    ))
    .await?;
    assert_eq!((status, errors), (200, json!({"errors": []})));

    // A filter matching nobody is accepted and reaches nobody.
    t.sim().set_trigger_interval(Duration::ZERO);
    let (status, answer) = trigger(
        &t,
        ASSIGNMENT_ALERT,
        json!({"recipients": {"attribute": {"field": "country", "operator": "eq", "value": "Atlantis"}}}),
    )
    .await?;
    assert_eq!(status, 200);
    let nobody = answer["id"].as_i64().unwrap_or(0);
    assert_eq!(t.sim().trigger(nobody).map(|t| t.recipients_count), Some(0));
    Ok(())
}

#[tokio::test]
async fn empty_body_reaches_the_ui_audience() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let response = t
        .app(
            Method::POST,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers"),
        )
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 200);
    let answer: Value = response.json().await?;
    let id = answer["id"].as_i64().unwrap_or(0);
    let members = t.sim().segment_members(HIGH_ENGAGEMENT).unwrap_or_default();
    let expected = eligible(t.sim(), &members);
    // The demo has unsubscribed readers: they are not sent to.
    assert!(expected.len() < members.len());
    let recipients = t
        .sim()
        .trigger(id)
        .map(|t| sorted(t.recipients))
        .unwrap_or_default();
    assert_eq!(recipients, expected);
    // The default subject is the broadcast's.
    let subject = t.sim().campaign(ASSIGNMENT_ALERT).map(|c| c.subject);
    assert!(
        t.sim()
            .deliveries(&DeliveryFilter::trigger(id))
            .iter()
            .all(|d| Some(&d.subject) == subject.as_ref() && d.data.is_none())
    );
    Ok(())
}

#[tokio::test]
async fn ids_emails_and_per_user_data() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    t.sim().set_trigger_interval(Duration::ZERO);
    let first = t
        .sim()
        .person("u00001")
        .and_then(|p| p.email)
        .unwrap_or_default();

    let (status, a) = trigger(
        &t,
        BREAKING_NEWS,
        json!({"ids": ["u00002", "u00003", "u00002"]}),
    )
    .await?;
    assert_eq!(status, 200);
    let recipients = t
        .sim()
        .trigger(a["id"].as_i64().unwrap_or(0))
        .map(|t| sorted(t.recipients));
    assert_eq!(
        recipients,
        Some(eligible(t.sim(), &["u00002".into(), "u00003".into()]))
    );

    let (status, b) = trigger(&t, BREAKING_NEWS, json!({"emails": [first.to_uppercase()]})).await?;
    assert_eq!(status, 200);
    let recipients = t
        .sim()
        .trigger(b["id"].as_i64().unwrap_or(0))
        .map(|t| t.recipients);
    assert_eq!(recipients, Some(eligible(t.sim(), &["u00001".into()])));

    let body = json!({
        "per_user_data": [
            {"id": "u00004", "data": {"variation": "growth", "subject": "Growth pick"}},
            {"email": t.sim().person("u00005").and_then(|p| p.email), "data": {"variation": "value"}}
        ],
        "data": {"subject": "Default pick", "assignment": 42}
    });
    let (status, c) = trigger(&t, BREAKING_NEWS, body).await?;
    assert_eq!(status, 200, "{c}");
    let deliveries = t
        .sim()
        .deliveries(&DeliveryFilter::trigger(c["id"].as_i64().unwrap_or(0)));
    let by_person: Vec<(String, String, Option<Value>)> = deliveries
        .into_iter()
        .map(|d| (d.person_id, d.subject, d.data))
        .collect();
    let expected_all = [
        (
            "u00004".to_owned(),
            "Growth pick".to_owned(),
            Some(json!({"variation": "growth", "subject": "Growth pick", "assignment": 42})),
        ),
        (
            "u00005".to_owned(),
            "Default pick".to_owned(),
            Some(json!({"variation": "value", "subject": "Default pick", "assignment": 42})),
        ),
    ];
    let expected: Vec<_> = expected_all
        .into_iter()
        .filter(|(id, _, _)| !eligible(t.sim(), std::slice::from_ref(id)).is_empty())
        .collect();
    assert_eq!(by_person, expected);
    Ok(())
}

#[tokio::test]
async fn missing_people_are_a_422_with_a_recorded_trigger() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    t.sim().set_trigger_interval(Duration::ZERO);
    let (status, body) = trigger(
        &t,
        BREAKING_NEWS,
        json!({"ids": ["u00001", "ghost-1", "ghost-2"]}),
    )
    .await?;
    assert_eq!(status, 422);
    assert_eq!(body["errors"][0]["status"], "422");
    assert_eq!(body["errors"][0]["source"]["pointer"], "/ids");
    let recorded = t.sim().triggers(Some(BREAKING_NEWS));
    assert_eq!(recorded.len(), 1);
    let id = recorded[0].id;
    let detail = body["errors"][0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains(&format!("trigger {id}")), "{detail}");
    assert_eq!(recorded[0].recipients_count, 0, "nothing is sent");
    assert!(t.sim().deliveries(&DeliveryFilter::trigger(id)).is_empty());

    let base = format!("/v1/campaigns/{BREAKING_NEWS}/triggers/{id}");
    let (_, status_body) = send(t.app(Method::GET, &base)).await?;
    assert_eq!(status_body["recipients_count"], 0);
    let (status, errors) = send(t.app(Method::GET, &format!("{base}/errors"))).await?;
    assert_eq!(status, 200);
    let lines: Vec<&str> = errors["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].starts_with("line 2:") && lines[0].contains("ghost-1"),
        "{lines:?}"
    );
    assert!(lines[1].starts_with("line 3:"), "{lines:?}");
    let (_, page) = send(t.app(Method::GET, &format!("{base}/errors?limit=1"))).await?;
    assert_eq!(page["errors"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["next"], 1);
    let (_, rest) = send(t.app(Method::GET, &format!("{base}/errors?start=1&limit=1"))).await?;
    assert_eq!(rest["errors"][0], lines[1]);
    assert!(rest.get("next").is_none());

    // With id_ignore_missing the found people are sent to.
    let (status, ok) = trigger(
        &t,
        BREAKING_NEWS,
        json!({"ids": ["u00001", "ghost-1"], "id_ignore_missing": true}),
    )
    .await?;
    assert_eq!(status, 200);
    let recipients = t
        .sim()
        .trigger(ok["id"].as_i64().unwrap_or(0))
        .map(|t| t.recipients);
    assert_eq!(recipients, Some(eligible(t.sim(), &["u00001".into()])));
    Ok(())
}

#[tokio::test]
async fn invalid_triggers_are_422_and_record_nothing() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    t.sim().set_trigger_interval(Duration::ZERO);
    let too_many: Vec<String> = (0..10_001).map(|i| format!("u{i}")).collect();
    let cases = [
        (json!({"recipients": {}}), "/recipients"),
        (json!({"recipients": {"and": []}}), "/recipients/and"),
        (
            json!({"recipients": {"segment": {"id": 999}}}),
            "/recipients",
        ),
        (
            json!({"recipients": {"attribute": {"field": "x", "operator": "gte", "value": "1"}}}),
            "/recipients/attribute/operator",
        ),
        (
            json!({"recipients": {"segment": {"id": 4}}, "ids": ["u00001"]}),
            "",
        ),
        (json!({"ids": []}), "/ids"),
        (json!({"ids": [1, 2]}), "/ids/0"),
        (json!({"ids": too_many}), "/ids"),
        (json!({"emails": "a@b.c"}), "/emails"),
        (json!({"per_user_data": [{"data": {}}]}), "/per_user_data/0"),
        (
            json!({"per_user_data": [{"id": "u00001", "email": "x@y.z"}]}),
            "/per_user_data/0",
        ),
        (json!({"data": [1]}), "/data"),
        (json!({"data": {"blob": "x".repeat(50_000)}}), "/data"),
        (
            json!({"data_file_url": "https://example.com/data.json"}),
            "/data_file_url",
        ),
        (json!({"id_ignore_missing": "yes"}), "/id_ignore_missing"),
    ];
    for (body, pointer) in cases {
        let (status, answer) = trigger(&t, ASSIGNMENT_ALERT, body.clone()).await?;
        assert_eq!(status, 422, "{body}: {answer}");
        assert_eq!(
            answer["errors"][0]["source"]["pointer"], pointer,
            "{body}: {answer}"
        );
        assert_eq!(answer["errors"][0]["status"], "422");
    }
    // Exactly 50,000 bytes of data is fine.
    let filler = "x".repeat(50_000 - r#"{"b":""}"#.len());
    let (status, _) = trigger(
        &t,
        ASSIGNMENT_ALERT,
        json!({"ids": ["u00001"], "data": {"b": filler}}),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        t.sim().triggers(None).len(),
        1,
        "only the valid one is recorded"
    );

    // Not JSON / not an object: 400.
    let raw = t
        .app(
            Method::POST,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers"),
        )
        .header("content-type", "application/json")
        .body("[1,2]");
    assert_eq!(status_of(raw).await?, 400);

    // A broadcast that is not active.
    let (status, answer) = trigger(&t, DRAFT_BROADCAST, json!({})).await?;
    assert_eq!(status, 422, "{answer}");
    assert_eq!(t.sim().triggers(None).len(), 1);
    Ok(())
}

#[tokio::test]
async fn unknown_broadcasts_are_404() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    // A campaign id, a newsletter-only id, an unknown id, a non-integer.
    for id in ["1", "999", "abc", "-3"] {
        let (status, body) = send(
            t.app(Method::POST, &format!("/v1/campaigns/{id}/triggers"))
                .json(&json!({})),
        )
        .await?;
        assert_eq!(status, 404, "{id}");
        assert_eq!(body["errors"][0]["status"], "404");
        assert_eq!(
            status_of(t.app(Method::GET, &format!("/v1/broadcasts/{id}/triggers"))).await?,
            404
        );
    }
    assert_eq!(
        status_of(t.app(
            Method::GET,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers/77")
        ))
        .await?,
        404
    );
    assert_eq!(
        status_of(t.app(
            Method::GET,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers/77/errors")
        ))
        .await?,
        404
    );
    assert!(t.sim().triggers(None).is_empty());
    // A 404 does not open a trigger window.
    let (status, _) = trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00001"]})).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test]
async fn one_trigger_per_window_across_the_workspace_by_default() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    assert_eq!(t.sim().trigger_scope(), TriggerScope::Workspace);
    let (status, _) = trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00001"]})).await?;
    assert_eq!(status, 200);
    // Another broadcast waits for the same window.
    let response = t
        .app(
            Method::POST,
            &format!("/v1/campaigns/{BREAKING_NEWS}/triggers"),
        )
        .json(&json!({"ids": ["u00002"]}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 429);
    assert!(retry_after(&response).is_some_and(|w| (9..=10).contains(&w)));
    let body: Value = response.json().await?;
    let detail = body["errors"][0]["detail"].as_str().unwrap_or_default();
    assert!(detail.contains("in this workspace"), "{detail}");
    assert!(t.sim().triggers(Some(BREAKING_NEWS)).is_empty());
    t.sim().advance(Duration::from_secs(10));
    let (status, _) = trigger(&t, BREAKING_NEWS, json!({"ids": ["u00002"]})).await?;
    assert_eq!(status, 200);
    // ... and now the first one waits for it.
    let (status, _) = trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00003"]})).await?;
    assert_eq!(status, 429);
    Ok(())
}

#[tokio::test]
async fn one_trigger_per_window_per_broadcast() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    assert_eq!(t.sim().trigger_interval(), Duration::from_secs(10));
    let (status, limits) = send(
        t.control(Method::POST, "/_sim/rate-limits")
            .json(&json!({"trigger_scope": "per_broadcast"})),
    )
    .await?;
    assert_eq!(
        (status, &limits["trigger_scope"]),
        (200, &json!("per_broadcast"))
    );
    assert_eq!(t.sim().trigger_scope(), TriggerScope::PerBroadcast);
    let (status, _) = trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00001"]})).await?;
    assert_eq!(status, 200);

    let response = t
        .app(
            Method::POST,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers"),
        )
        .json(&json!({"ids": ["u00002"]}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 429);
    let wait = retry_after(&response);
    assert!(wait.is_some_and(|w| (9..=10).contains(&w)), "{wait:?}");
    let body: Value = response.json().await?;
    assert_eq!(body["errors"][0]["status"], "429");
    assert_eq!(
        t.sim().triggers(Some(ASSIGNMENT_ALERT)).len(),
        1,
        "a 429 records nothing"
    );

    // Another broadcast is not affected.
    let (status, _) = trigger(&t, BREAKING_NEWS, json!({"ids": ["u00002"]})).await?;
    assert_eq!(status, 200);

    // Still closed after 9 s, open after 10 s (simulated).
    t.sim().advance(Duration::from_secs(9));
    let response = t
        .app(
            Method::POST,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers"),
        )
        .json(&json!({"ids": ["u00002"]}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(retry_after(&response), Some(1));
    t.sim().advance(Duration::from_secs(1));
    let (status, _) = trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00002"]})).await?;
    assert_eq!(status, 200);
    assert_eq!(t.sim().triggers(Some(ASSIGNMENT_ALERT)).len(), 2);

    // On the real clock, with a short interval.
    t.sim().set_trigger_interval(Duration::from_millis(300));
    t.sim().advance(Duration::from_secs(1));
    assert_eq!(
        trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00003"]}))
            .await?
            .0,
        200
    );
    assert_eq!(
        trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00003"]}))
            .await?
            .0,
        429
    );
    t.sim().advance(Duration::from_millis(350));
    assert_eq!(
        trigger(&t, ASSIGNMENT_ALERT, json!({"ids": ["u00003"]}))
            .await?
            .0,
        200
    );
    Ok(())
}

#[tokio::test]
async fn concurrent_triggers_of_one_broadcast_send_once() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let request = || {
        t.app(
            Method::POST,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers"),
        )
        .json(&json!({"ids": ["u00001"]}))
        .send()
    };
    let (a, b) = tokio::join!(request(), request());
    let mut statuses = vec![a?.status().as_u16(), b?.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 429]);
    assert_eq!(t.sim().triggers(None).len(), 1);
    Ok(())
}

#[tokio::test]
async fn accept_then_drop_leaves_exactly_one_trigger() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    t.sim()
        .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
    let body =
        json!({"recipients": {"segment": {"id": HIGH_ENGAGEMENT}}, "data": {"send_id": "s-42"}});
    let lost = t
        .app(
            Method::POST,
            &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers"),
        )
        .json(&body)
        .send()
        .await;
    let err = lost
        .err()
        .ok_or_else(|| anyhow::anyhow!("the response must be lost"))?;
    assert!(err.status().is_none(), "{err:?}");

    let recorded = t.sim().triggers(Some(ASSIGNMENT_ALERT));
    assert_eq!(recorded.len(), 1);
    let id = recorded[0].id;
    assert!(recorded[0].recipients_count > 0);
    // A blind retry right away hits the broadcast's window: still one trigger.
    assert_eq!(trigger(&t, ASSIGNMENT_ALERT, body.clone()).await?.0, 429);
    assert_eq!(t.sim().triggers(None).len(), 1);

    // Reconciliation: the list shows it, its status carries the sender's marker.
    let (_, list) = send(t.app(
        Method::GET,
        &format!("/v1/broadcasts/{ASSIGNMENT_ALERT}/triggers"),
    ))
    .await?;
    assert_eq!(list["triggers"].as_array().map(Vec::len), Some(1));
    assert_eq!(list["triggers"][0]["id"], id);
    let (_, status) = send(t.app(
        Method::GET,
        &format!("/v1/campaigns/{ASSIGNMENT_ALERT}/triggers/{id}"),
    ))
    .await?;
    assert_eq!(status["recipients_filter"]["data"]["send_id"], "s-42");
    assert_eq!(
        status["recipients_count"].as_u64(),
        Some(
            t.sim()
                .deliveries(&DeliveryFilter::broadcast(ASSIGNMENT_ALERT))
                .len() as u64
        )
    );
    Ok(())
}

#[tokio::test]
async fn broadcasts_added_by_tests() -> anyhow::Result<()> {
    let t = spawn(crate::helpers::empty_unlimited()).await?;
    assert!(
        t.sim().campaigns().is_empty(),
        "an empty workspace has no campaigns"
    );
    assert_eq!(
        t.sim()
            .add_broadcast(NewBroadcast::new("x", AudienceFilter::segment(1))),
        Err(SimError::UnknownSegment(1))
    );
    for i in 1..=3 {
        let mut attrs = serde_json::Map::new();
        attrs.insert("email".into(), json!(format!("p{i}@example.com")));
        attrs.insert("plan".into(), json!(if i == 2 { "pro" } else { "free" }));
        t.sim().upsert_person(&format!("p{i}"), attrs);
    }
    let id = t.sim().add_broadcast(NewBroadcast::new(
        "Pro alert",
        AudienceFilter::attribute_eq("plan", "pro"),
    ))?;
    assert_eq!(id, 1);
    let (status, answer) = trigger(&t, id, json!({})).await?;
    assert_eq!(status, 200);
    let trigger_id = answer["id"].as_i64().unwrap_or(0);
    assert_eq!(
        t.sim().trigger(trigger_id).map(|t| t.recipients),
        Some(vec!["p2".to_owned()])
    );
    Ok(())
}
