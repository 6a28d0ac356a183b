//! Track writes about people: v1 identify and events, v2 entity and batch (200, 207), retries
//! that Customer.io's event deduplication makes safe.

use std::collections::BTreeSet;

use cio_client::{
    CioError, EncodedOp, Event, Identifier, MAX_BATCH_BYTES, PersonOp, batch_body_len,
};
use cio_sim::{Fault, SimApi};
use serde_json::{Map, Value, json};

use crate::helpers::{client, requests_to, spawn_empty_sim};

/// A ULID whose last characters are `n` (valid Crockford digits).
fn ulid(n: u32) -> String {
    format!("01JDQ7Y1M3E3XH5Q9W{n:08}")
}

fn obj(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn id(value: &str) -> Identifier {
    Identifier::Id(value.to_owned())
}

#[tokio::test]
async fn batch_of_identifies_and_events_is_accepted() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let ops = vec![
        PersonOp::identify(
            id("p1"),
            obj(json!({"plan":"pro","email":"p1@example.com"})),
        ),
        PersonOp::event(
            id("p1"),
            "assignment_opened",
            ulid(1),
            Some(1_772_013_598),
            obj(json!({"assignment":"Q4 Crypto Outlook"})),
        ),
        PersonOp::identify(
            Identifier::Email("p2@example.com".into()),
            obj(json!({"plan":"free"})),
        ),
    ];
    let outcome = client.batch(&ops).await.unwrap();
    assert!(outcome.all_accepted(), "{outcome:?}");

    let logged = requests_to(&running, "/api/v2/batch");
    assert_eq!(logged.len(), 1);
    assert_eq!((logged[0].method.as_str(), logged[0].status), ("POST", 200));
    let sent = logged[0].body.clone().unwrap();
    assert_eq!(sent, json!({"batch": serde_json::to_value(&ops).unwrap()}));
    assert_eq!(
        sent["batch"][1]["attributes"]["assignment"],
        "Q4 Crypto Outlook"
    );

    let p1 = running.sim.person("p1").unwrap();
    assert_eq!(p1.attributes["plan"], "pro");
    assert_eq!(p1.email.as_deref(), Some("p1@example.com"));
    let events = running.sim.events_for("p1");
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name, "assignment_opened");
    assert_eq!(events[0].id.as_deref(), Some(ulid(1).as_str()));
    assert_eq!(events[0].timestamp, Some(1_772_013_598));
    assert_eq!(events[0].data, json!({"assignment":"Q4 Crypto Outlook"}));
    let p2 = running.sim.person_by_email("p2@example.com").unwrap();
    assert_eq!(p2.attributes["plan"], "free");
}

#[tokio::test]
async fn batch_207_maps_failures_to_op_indices_and_keeps_the_rest() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let ops = vec![
        PersonOp::identify(id("ok-1"), obj(json!({"plan":"pro"}))),
        // Customer.io allows event names of at most 100 bytes.
        PersonOp::event(id("ok-1"), "n".repeat(101), ulid(1), None, Map::new()),
        PersonOp::event(id("ok-1"), "clicked", ulid(2), None, Map::new()),
        // Attribute values of at most 1000 bytes.
        PersonOp::identify(id("bad-2"), obj(json!({"bio": "x".repeat(1001)}))),
        PersonOp::identify(id("ok-3"), obj(json!({"plan":"free"}))),
    ];
    let outcome = client.batch(&ops).await.unwrap();
    let failed: BTreeSet<usize> = outcome.failures.iter().map(|f| f.batch_index).collect();
    assert_eq!(failed, BTreeSet::from([1, 3]), "{outcome:?}");
    assert!(outcome.failures.iter().all(|f| !f.message.is_empty()));
    let name_failure = outcome
        .failures
        .iter()
        .find(|f| f.batch_index == 1)
        .unwrap();
    assert!(
        name_failure
            .field
            .as_deref()
            .unwrap_or_default()
            .contains("name"),
        "{name_failure:?}"
    );

    // A 207 is not retried: one request.
    let logged = requests_to(&running, "/api/v2/batch");
    assert_eq!(
        logged.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![207]
    );
    // The other ops were applied.
    assert_eq!(
        running.sim.person("ok-1").unwrap().attributes["plan"],
        "pro"
    );
    assert_eq!(
        running.sim.person("ok-3").unwrap().attributes["plan"],
        "free"
    );
    assert!(running.sim.person("bad-2").is_none());
    let names: Vec<String> = running
        .sim
        .events_for("ok-1")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, vec!["clicked"]);
}

#[tokio::test]
async fn batch_is_retried_on_lost_answers_500_and_429_without_duplicating_events() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running.sim.push_faults(
        Some(SimApi::Track),
        [
            // Processed, but the answer never arrives.
            Fault::AcceptThenDrop,
            Fault::Status {
                status: 500,
                retry_after_secs: None,
            },
            Fault::Status {
                status: 429,
                retry_after_secs: Some(1),
            },
        ],
    );
    let ops: Vec<PersonOp> = (0..3)
        .map(|n| {
            PersonOp::event(
                id("reader"),
                "article_read",
                ulid(n),
                None,
                obj(json!({"n": n})),
            )
        })
        .chain([PersonOp::identify(
            id("reader"),
            obj(json!({"last_article":"a-2"})),
        )])
        .collect();
    let outcome = client.batch(&ops).await.unwrap();
    assert!(outcome.all_accepted());

    let statuses: Vec<u16> = requests_to(&running, "/api/v2/batch")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![0, 500, 429, 200]);
    // Sent twice in full (the dropped answer and the final 200), recorded once.
    let events = running.sim.events_for("reader");
    let ids: Vec<String> = events.iter().filter_map(|e| e.id.clone()).collect();
    assert_eq!(ids, vec![ulid(0), ulid(1), ulid(2)]);
    assert_eq!(
        running.sim.person("reader").unwrap().attributes["last_article"],
        "a-2"
    );
}

#[tokio::test]
async fn pre_encoded_ops_are_sent_as_measured() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let encoded: Vec<EncodedOp> = (0..5)
        .map(|n| {
            PersonOp::identify(id(&format!("e{n}")), obj(json!({"n": n})))
                .encode()
                .unwrap()
        })
        .collect();
    let outcome = client.batch_encoded(&encoded).await.unwrap();
    assert!(outcome.all_accepted());
    let logged = requests_to(&running, "/api/v2/batch");
    let body = serde_json::to_vec(logged[0].body.as_ref().unwrap()).unwrap();
    // The simulator's log re-serialises compactly, as the client does.
    assert_eq!(body.len(), batch_body_len(&encoded));
    assert_eq!(running.sim.person("e4").unwrap().attributes["n"], 4);

    // Nothing to send: no request.
    running.sim.clear_requests();
    assert!(client.batch_encoded(&[]).await.unwrap().all_accepted());
    assert!(running.sim.requests().is_empty());
}

#[tokio::test]
async fn an_oversized_batch_or_a_bad_event_id_is_refused_before_sending() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let blob = "x".repeat(900);
    // 30 attributes of ~900 bytes: ~28 KB per op, under the 32 KB op limit.
    let attributes: Map<String, Value> = (0..30).map(|i| (format!("a{i}"), json!(blob))).collect();
    let ops: Vec<PersonOp> = (0..20)
        .map(|n| PersonOp::identify(id(&format!("big{n}")), attributes.clone()))
        .collect();
    let encoded: Vec<EncodedOp> = ops.iter().map(|op| op.encode().unwrap()).collect();
    assert!(batch_body_len(&encoded) > MAX_BATCH_BYTES);
    let err = client.batch(&ops).await.unwrap_err();
    assert!(matches!(err, CioError::Config { .. }), "{err:?}");

    let bad = [
        PersonOp::identify(id("fine"), Map::new()),
        PersonOp::event(id("fine"), "x", "order-42", None, Map::new()),
    ];
    let err = client.batch(&bad).await.unwrap_err();
    assert!(err.to_string().contains("op 1"), "{err}");
    let err = client
        .track_event("fine", &Event::new("x", "order-42"))
        .await
        .unwrap_err();
    assert!(matches!(err, CioError::Config { .. }), "{err:?}");
    assert!(running.sim.requests().is_empty());
}

#[tokio::test]
async fn entity_sends_one_op() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    client
        .entity(&PersonOp::identify(
            Identifier::Email("solo@example.com".into()),
            obj(json!({"first_name":"Jane"})),
        ))
        .await
        .unwrap();
    let person = running.sim.person_by_email("solo@example.com").unwrap();
    assert_eq!(person.attributes["first_name"], "Jane");
    let cio = Identifier::CioId(person.cio_id.clone());
    client
        .entity(&PersonOp::event(
            cio,
            "signed_up",
            ulid(7),
            None,
            obj(json!({"source":"web"})),
        ))
        .await
        .unwrap();
    let logged = requests_to(&running, "/api/v2/entity");
    assert_eq!(logged.len(), 2);
    assert_eq!(
        logged[1].body.as_ref().unwrap()["identifiers"],
        json!({"cio_id": person.cio_id})
    );
    assert_eq!(running.sim.events().len(), 1);
    assert_eq!(running.sim.events()[0].data, json!({"source":"web"}));
}

#[tokio::test]
async fn v1_identify_creates_then_merges_attributes() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    client
        .identify(
            "reader-1",
            &obj(json!({"email":"r1@example.com","plan":"free","score":3})),
        )
        .await
        .unwrap();
    client
        .identify("reader-1", &obj(json!({"plan":"pro","newsletter":true})))
        .await
        .unwrap();
    let person = running.sim.person("reader-1").unwrap();
    assert_eq!(person.email.as_deref(), Some("r1@example.com"));
    assert_eq!(person.attributes["plan"], "pro");
    assert_eq!(person.attributes["score"], 3);
    assert_eq!(person.attributes["newsletter"], true);

    let logged = requests_to(&running, "/api/v1/customers/");
    assert_eq!(logged.len(), 2);
    assert_eq!(logged[1].method, "PUT");
    assert_eq!(logged[1].path, "/api/v1/customers/reader-1");
    assert_eq!(
        logged[1].body,
        Some(json!({"plan":"pro","newsletter":true}))
    );
}

#[tokio::test]
async fn v1_event_is_retried_after_a_lost_answer_and_recorded_once() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    client
        .identify("a@b.io", &obj(json!({"plan":"pro"})))
        .await
        .unwrap();
    running
        .sim
        .push_faults(Some(SimApi::Track), [Fault::AcceptThenDrop]);
    let mut event = Event::new("purchase", ulid(9).to_lowercase());
    event.timestamp = Some(1_772_000_000);
    event.data = obj(json!({"price": 23.45}));
    client.track_event("a@b.io", &event).await.unwrap();

    let logged = requests_to(&running, "/api/v1/customers/");
    let statuses: Vec<u16> = logged.iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 0, 200]);
    assert_eq!(logged[1].path, "/api/v1/customers/a%40b.io/events");
    assert_eq!(
        logged[2].body,
        Some(
            json!({"name":"purchase","id":ulid(9).to_lowercase(),"timestamp":1_772_000_000,"data":{"price":23.45}})
        )
    );
    let all = running.sim.events();
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].name, "purchase");
    assert_eq!(all[0].id.as_deref(), Some(ulid(9).as_str()));
}
