//! Track API v2: `/api/v2/entity` and `/api/v2/batch`.

use std::collections::BTreeSet;

use reqwest::{Method, RequestBuilder};
use serde_json::{Map, Value, json};

use crate::events::ulid;
use crate::helpers::{TestSim, empty_unlimited, send, spawn, status_of};

fn batch(t: &TestSim, ops: Vec<Value>) -> RequestBuilder {
    t.track(Method::POST, "/api/v2/batch")
        .json(&json!({ "batch": ops }))
}

fn entity(t: &TestSim, op: Value) -> RequestBuilder {
    t.track(Method::POST, "/api/v2/entity").json(&op)
}

fn identify(id: &str, attributes: Value) -> Value {
    json!({"type": "person", "identifiers": {"id": id}, "action": "identify", "attributes": attributes})
}

fn event(id: &str, name: &str, event_id: Option<String>) -> Value {
    let mut op = json!({"type": "person", "identifiers": {"id": id}, "action": "event", "name": name, "attributes": {"src": "v2"}});
    if let (Some(event_id), Some(obj)) = (event_id, op.as_object_mut()) {
        obj.insert("id".into(), json!(event_id));
    }
    op
}

/// The `batch_index` values of a 207 body, and checks every error has the documented fields.
fn error_indexes(body: &Value) -> anyhow::Result<BTreeSet<u64>> {
    let errors = body["errors"]
        .as_array()
        .ok_or_else(|| anyhow::anyhow!("no errors array: {body}"))?;
    for e in errors {
        for field in ["reason", "field", "message"] {
            anyhow::ensure!(e[field].is_string(), "{field} missing in {e}");
        }
    }
    errors
        .iter()
        .map(|e| {
            e["batch_index"]
                .as_u64()
                .ok_or_else(|| anyhow::anyhow!("no batch_index in {e}"))
        })
        .collect()
}

#[tokio::test]
async fn entity_applies_one_op_or_rejects_it() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let (status, body) = send(entity(&t, identify("u1", json!({"first_name": "Jane"})))).await?;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(
        t.sim()
            .person("u1")
            .map(|p| p.attributes["first_name"].clone()),
        Some(json!("Jane"))
    );

    // Invalid op: 400 in the v2 shape (no batch_index), nothing applied.
    let (status, body) = send(entity(
        &t,
        json!({"type": "person", "identifiers": {"id": "u2"}, "action": "event"}),
    ))
    .await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0]["field"], "name");
    assert!(body["errors"][0]["reason"].is_string() && body["errors"][0]["message"].is_string());
    assert!(body["errors"][0].get("batch_index").is_none(), "{body}");
    assert!(t.sim().person("u2").is_none());

    // Over 32 KiB: rejected whole.
    let big = identify(
        "u3",
        json!({"blob": "x".repeat(900), "pad": "y".repeat(200)}),
    );
    let mut attrs = Map::new();
    for i in 0..40 {
        attrs.insert(format!("a{i}"), json!("z".repeat(900)));
    }
    let too_big = identify("u3", Value::Object(attrs));
    assert!(too_big.to_string().len() > 32 * 1024);
    let (status, body) = send(entity(&t, too_big)).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0]["reason"], "too_large");
    assert!(t.sim().person("u3").is_none());
    assert_eq!(status_of(entity(&t, big)).await?, 200);

    // Malformed bodies.
    let raw = |text: &'static str| {
        t.track(Method::POST, "/api/v2/entity")
            .header("content-type", "application/json")
            .body(text)
    };
    assert_eq!(status_of(raw("{oops")).await?, 400);
    assert_eq!(status_of(raw("[]")).await?, 400);
    assert_eq!(status_of(raw("")).await?, 400);
    Ok(())
}

#[tokio::test]
async fn batch_with_invalid_ops_answers_207_and_applies_the_rest() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    t.sim().upsert_person("gone", Map::new());
    let ops = vec![
        identify("a", json!({"plan": "pro"})),           // 0 ok
        json!({"type": "person", "action": "identify"}), // 1 no identifiers
        event("a", "opened", Some(ulid(1))),             // 2 ok
        json!({"type": "person", "identifiers": {"id": "a"}, "action": "event"}), // 3 no name
        json!({"type": "person", "identifiers": {"id": "gone"}, "action": "delete"}), // 4 ok
        json!({"type": "person", "identifiers": {"id": "b", "email": "b@e.com"}, "action": "identify"}), // 5 two ids
        json!("not an object"), // 6
        json!({"type": "person", "identifiers": {"id": "c"}, "action": "levitate"}), // 7 unknown action
        json!({"type": "company", "identifiers": {"id": "c"}, "action": "identify"}), // 8 unknown type
        identify("c", json!({"n": 1})),                                               // 9 ok
    ];
    let (status, body) = send(batch(&t, ops)).await?;
    assert_eq!(status, 207, "{body}");
    assert_eq!(
        error_indexes(&body)?,
        BTreeSet::from([1, 3, 5, 6, 7, 8]),
        "{body}"
    );
    // The valid ones were applied, in order.
    assert_eq!(
        t.sim().person("a").map(|p| p.attributes["plan"].clone()),
        Some(json!("pro"))
    );
    let events = t.sim().events_for("a");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name, "opened");
    assert_eq!(
        events[0].data,
        json!({"src": "v2"}),
        "v2 event data is `attributes`"
    );
    assert!(t.sim().person("gone").is_none());
    assert!(t.sim().person("c").is_some());
    assert!(t.sim().person("b").is_none() && t.sim().person_by_email("b@e.com").is_none());

    // All valid: 200 {}.
    let (status, body) = send(batch(&t, vec![identify("d", json!({}))])).await?;
    assert_eq!((status, body), (200, json!({})));
    Ok(())
}

#[tokio::test]
async fn batch_size_limits() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    // ~20 KB per op: 30 ops are over 500 KiB; 24 are not.
    let op = |i: usize| {
        identify(
            &format!("u{i}"),
            json!({"blob": "x".repeat(1000), "more": "y".repeat(1000)}),
        )
    };
    let heavy = |i: usize| {
        let mut attrs = Map::new();
        for k in 0..20 {
            attrs.insert(format!("k{k}"), json!("v".repeat(990)));
        }
        identify(&format!("h{i}"), Value::Object(attrs))
    };
    let over: Vec<Value> = (0..30).map(heavy).collect();
    assert!(json!({ "batch": over }).to_string().len() > 500 * 1024);
    let (status, body) = send(batch(&t, over)).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["errors"][0]["reason"], "too_large");
    assert_eq!(
        t.sim().people_count(),
        0,
        "an over-size batch applies nothing"
    );

    let under: Vec<Value> = (0..24).map(heavy).collect();
    let size = json!({ "batch": under }).to_string().len();
    assert!(size > 400 * 1024 && size < 500 * 1024, "{size}");
    assert_eq!(send(batch(&t, under)).await?, (200, json!({})));
    assert_eq!(t.sim().people_count(), 24);

    // One op over 32 KiB: that op fails (207), the others apply.
    let mut attrs = Map::new();
    for k in 0..40 {
        attrs.insert(format!("k{k}"), json!("v".repeat(900)));
    }
    let ops = vec![op(1), identify("too-big", Value::Object(attrs)), op(2)];
    let (status, body) = send(batch(&t, ops)).await?;
    assert_eq!(status, 207, "{body}");
    assert_eq!(error_indexes(&body)?, BTreeSet::from([1]));
    assert_eq!(body["errors"][0]["reason"], "too_large");
    assert!(t.sim().person("too-big").is_none());
    assert!(t.sim().person("u1").is_some() && t.sim().person("u2").is_some());

    // Empty, missing, wrong type, malformed: 400 in the v2 shape.
    for body in [
        json!({"batch": []}),
        json!({}),
        json!({"batch": {}}),
        json!([1]),
    ] {
        let (status, reply) = send(t.track(Method::POST, "/api/v2/batch").json(&body)).await?;
        assert_eq!(status, 400, "{body} -> {reply}");
        assert!(reply["errors"][0]["message"].is_string(), "{reply}");
    }
    let malformed = t
        .track(Method::POST, "/api/v2/batch")
        .header("content-type", "application/json")
        .body(r#"{"batch":[{"type":"person"#);
    assert_eq!(status_of(malformed).await?, 400);
    Ok(())
}

#[tokio::test]
async fn v2_identify_enforces_limits() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let many = |n: usize| -> Value {
        Value::Object((0..n).map(|i| (format!("a{i}"), json!(i))).collect())
    };
    let ops = vec![
        identify("ok-name", json!({ "n".repeat(150): 1 })), // 0 ok
        identify("bad-name", json!({ "n".repeat(151): 1 })), // 1
        identify("ok-value", json!({ "v": "x".repeat(1000) })), // 2 ok
        identify("bad-value", json!({ "v": "x".repeat(1001) })), // 3
        identify("bad-object", json!({ "v": {"nested": "x".repeat(1000)} })), // 4 serialized > 1000
        identify("ok-many", many(300)),                     // 5 ok
        identify("bad-many", many(301)),                    // 6
        identify(&"i".repeat(151), json!({})),              // 7 id too long
        identify("ok-id", json!({"id": "i".repeat(150)})),  // 8 ok
        identify("bad-attr-id", json!({"id": "i".repeat(151)})), // 9
    ];
    let (status, body) = send(batch(&t, ops)).await?;
    assert_eq!(status, 207, "{body}");
    assert_eq!(
        error_indexes(&body)?,
        BTreeSet::from([1, 3, 4, 6, 7, 9]),
        "{body}"
    );
    let fields: Vec<&str> = body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["field"].as_str())
        .collect();
    assert!(
        fields.contains(&format!("attributes.{}", "n".repeat(151)).as_str()),
        "{fields:?}"
    );
    assert!(fields.contains(&"attributes.v"), "{fields:?}");
    for id in ["ok-name", "ok-value", "ok-many", "ok-id"] {
        assert!(t.sim().person(id).is_some(), "{id} not applied");
    }
    for id in [
        "bad-name",
        "bad-value",
        "bad-object",
        "bad-many",
        "bad-attr-id",
    ] {
        assert!(t.sim().person(id).is_none(), "{id} applied");
    }
    assert_eq!(
        t.sim().person("ok-many").map(|p| p.attributes.len()),
        Some(300)
    );
    Ok(())
}

#[tokio::test]
async fn v2_identify_merges_attributes() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let apply = |ops: Vec<Value>| async {
        let (status, body) = send(batch(&t, ops)).await?;
        anyhow::ensure!(status == 200, "{status}: {body}");
        Ok::<_, anyhow::Error>(())
    };
    apply(vec![identify(
        "u1",
        json!({"a": 1, "b": "x", "c": true, "email": "U1@e.com"}),
    )])
    .await?;
    apply(vec![identify("u1", json!({"b": null, "c": "", "d": 2}))]).await?;
    let p = t.sim().person("u1").ok_or_else(|| anyhow::anyhow!("u1"))?;
    assert_eq!(
        p.attributes.get("a"),
        Some(&json!(1)),
        "untouched attributes stay"
    );
    assert!(!p.attributes.contains_key("b") && !p.attributes.contains_key("c"));
    assert_eq!(p.attributes.get("d"), Some(&json!(2)));
    assert_eq!(p.email.as_deref(), Some("U1@e.com"));

    // `_update` (inside attributes) never creates, but updates.
    apply(vec![
        identify("ghost", json!({"_update": true, "a": 1})),
        identify("u1", json!({"_update": true, "e": 5})),
    ])
    .await?;
    assert!(t.sim().person("ghost").is_none());
    assert_eq!(
        t.sim().person("u1").map(|p| p.attributes["e"].clone()),
        Some(json!(5))
    );
    assert!(
        !t.sim()
            .person("u1")
            .is_some_and(|p| p.attributes.contains_key("_update"))
    );

    // By email: the same person (case-insensitive); a new email creates an id-less person.
    apply(vec![
        json!({"type": "person", "identifiers": {"email": "u1@E.com"}, "action": "identify", "attributes": {"via": "email"}}),
        json!({"type": "person", "identifiers": {"email": "new@e.com"}, "action": "identify", "attributes": {"x": 1}}),
    ])
    .await?;
    assert_eq!(
        t.sim().person("u1").map(|p| p.attributes["via"].clone()),
        Some(json!("email"))
    );
    assert!(
        t.sim()
            .person_by_email("new@e.com")
            .is_some_and(|p| p.id.is_none())
    );

    // By cio_id: can set the id of the id-less person.
    let cio = t
        .sim()
        .person_by_email("new@e.com")
        .map(|p| p.cio_id)
        .unwrap_or_default();
    apply(vec![json!({"type": "person", "identifiers": {"cio_id": cio}, "action": "identify", "attributes": {"id": "u2"}})]).await?;
    assert_eq!(
        t.sim().person("u2").and_then(|p| p.email),
        Some("new@e.com".to_owned())
    );
    assert_eq!(t.sim().people_count(), 2);
    Ok(())
}

#[tokio::test]
async fn event_ids_are_deduplicated_across_v1_and_v2() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let v1 = |id: String| {
        t.track(Method::POST, "/api/v1/customers/u1/events")
            .json(&json!({"name": "v1", "id": id}))
    };
    assert_eq!(status_of(v1(ulid(1))).await?, 200);
    assert_eq!(
        status_of(entity(&t, event("u1", "v2", Some(ulid(1))))).await?,
        200
    );
    assert_eq!(
        status_of(entity(&t, event("u1", "v2", Some(ulid(2))))).await?,
        200
    );
    assert_eq!(status_of(v1(ulid(2))).await?, 200);
    // Within one batch too.
    let ops = vec![
        event("u1", "b", Some(ulid(3))),
        event("u1", "b", Some(ulid(3))),
    ];
    assert_eq!(send(batch(&t, ops)).await?, (200, json!({})));

    let names: Vec<String> = t
        .sim()
        .events_for("u1")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["v1", "v2", "b"]);
    assert_eq!(t.sim().duplicate_events_dropped(), 3);

    // v2 event rules: name required, at most 100 bytes; id a ULID; page and screen are events.
    let ops = vec![
        event("u1", &"n".repeat(101), None),
        event("u1", "ok", Some("not-a-ulid".into())),
        json!({"type": "person", "identifiers": {"id": "u1"}, "action": "page", "name": "/pricing"}),
        json!({"type": "person", "identifiers": {"id": "u1"}, "action": "screen", "name": "Home", "timestamp": "yesterday"}),
    ];
    let (status, body) = send(batch(&t, ops)).await?;
    assert_eq!(status, 207);
    assert_eq!(error_indexes(&body)?, BTreeSet::from([0, 1, 3]), "{body}");
    assert_eq!(t.sim().event_count(), 4);
    Ok(())
}

#[tokio::test]
async fn v2_delete_suppress_merge_and_unmodelled_ops() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let person = |id: &str, action: &str| json!({"type": "person", "identifiers": {"id": id}, "action": action});
    let ops = vec![
        identify("p", json!({"plan": "pro"})),
        identify("s", json!({"plan": "free", "city": "Oslo"})),
        identify("x", json!({"email": "x@e.com"})),
        event("s", "from-secondary", None),
        json!({"type": "person", "action": "merge", "primary": {"id": "p"}, "secondary": {"id": "s"}}),
        person("x", "suppress"),
        identify("x", json!({"back": true})),
        json!({"type": "person", "identifiers": {"id": "p"}, "action": "add_device", "device": {"token": "t1", "platform": "ios"}}),
        json!({"type": "person", "identifiers": {"id": "p"}, "action": "add_relationships", "cio_relationships": [{"identifiers": {"object_type_id": "1", "object_id": "acme"}}]}),
        json!({"type": "object", "identifiers": {"object_type_id": "1", "object_id": "acme"}, "action": "identify", "attributes": {"name": "Acme"}}),
        json!({"type": "delivery", "identifiers": {"id": "d1"}, "action": "event", "name": "opened", "attributes": {"device_token": "t1"}}),
    ];
    assert_eq!(send(batch(&t, ops)).await?, (200, json!({})));
    let p = t.sim().person("p").ok_or_else(|| anyhow::anyhow!("p"))?;
    assert_eq!(
        (p.attributes["plan"].clone(), p.attributes["city"].clone()),
        (json!("pro"), json!("Oslo"))
    );
    assert!(t.sim().person("s").is_none());
    assert_eq!(t.sim().events_for("p").len(), 1);
    assert!(t.sim().person("x").is_none(), "suppressed, then ignored");
    assert!(t.sim().person_by_email("x@e.com").is_none());

    let ops = vec![
        person("x", "unsuppress"),
        identify("x", json!({"back": true})),
        json!({"type": "person", "identifiers": {"id": "p"}, "action": "add_device", "device": {}}),
        json!({"type": "person", "identifiers": {"id": "p"}, "action": "add_relationships"}),
        json!({"type": "object", "identifiers": {"object_id": "acme"}, "action": "identify"}),
        json!({"type": "delivery", "identifiers": {"id": "d1"}, "action": "event", "name": "clicked", "attributes": {"device_token": "t"}}),
        json!({"type": "person", "action": "merge", "primary": {"id": "p"}}),
        person("p", "delete"),
    ];
    let (status, body) = send(batch(&t, ops)).await?;
    assert_eq!(status, 207);
    assert_eq!(
        error_indexes(&body)?,
        BTreeSet::from([2, 3, 4, 5, 6]),
        "{body}"
    );
    assert!(
        t.sim().person("x").is_some(),
        "unsuppressed identifiers can be used again"
    );
    assert!(t.sim().person("p").is_none());
    assert_eq!(
        t.sim().event_count(),
        0,
        "a deleted person's events go with them"
    );
    Ok(())
}
