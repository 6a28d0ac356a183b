//! Ids in path segments: encoded so they address exactly the intended resource, and refused
//! (nothing sent) when no URL can carry them.

use cio_client::{CioError, Event, IdType};
use serde_json::{Map, json};

use crate::helpers::{client, spawn_empty_sim};

const ULID: &str = "01JDQ7Y1M3E3XH5Q9W9G1K2ZQ4";
/// One event id per case: Customer.io (and the simulator) drop an event id seen before.
const ULIDS: [&str; 3] = [
    "01JDQ7Y1M3E3XH5Q9W9G1K2ZQ5",
    "01JDQ7Y1M3E3XH5Q9W9G1K2ZQ6",
    "01JDQ7Y1M3E3XH5Q9W9G1K2ZQ7",
];

#[tokio::test]
async fn awkward_ids_hit_exactly_their_own_path() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let cases = [("a/b c", "a%2Fb%20c"), ("../x", "..%2Fx"), ("...", "...")];
    for ((id, encoded), event_id) in cases.into_iter().zip(ULIDS) {
        running.sim.clear_requests();
        let mut attributes = Map::new();
        attributes.insert("plan".into(), json!("gold"));
        client.identify(id, &attributes).await.unwrap();
        client
            .track_event(id, &Event::new("opened", event_id))
            .await
            .unwrap();
        let read = client.customer_attributes(id, IdType::Id).await.unwrap();
        assert_eq!(read.id.as_deref(), Some(id));
        assert_eq!(read.attribute("plan"), Some("gold"));

        let paths: Vec<String> = running
            .sim
            .requests()
            .into_iter()
            .map(|r| {
                assert_eq!(r.status, 200, "{r:?}");
                r.path
            })
            .collect();
        assert_eq!(
            paths,
            vec![
                format!("/api/v1/customers/{encoded}"),
                format!("/api/v1/customers/{encoded}/events"),
                format!("/v1/customers/{encoded}/attributes"),
            ]
        );
        // The simulator decoded the segment back into the id: one person, with the event.
        let person = running.sim.person(id).unwrap();
        assert_eq!(person.attributes["plan"], "gold");
        assert_eq!(running.sim.events_for(id).len(), 1, "{id}");
    }
    assert_eq!(running.sim.people_count(), 3);
}

#[tokio::test]
async fn dot_segment_ids_are_refused_before_anything_is_sent() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    for id in [".", ".."] {
        let errors = [
            client.identify(id, &Map::new()).await.unwrap_err(),
            client
                .track_event(id, &Event::new("opened", ULID))
                .await
                .unwrap_err(),
            client
                .customer_attributes(id, IdType::Id)
                .await
                .unwrap_err(),
            client.customer_segments(id, IdType::Id).await.unwrap_err(),
        ];
        for err in errors {
            assert!(matches!(err, CioError::Config { .. }), "{id:?}: {err:?}");
            assert!(!err.is_outcome_unknown());
            assert!(err.to_string().contains("nothing was sent"), "{err}");
        }
    }
    assert!(
        running.sim.requests().is_empty(),
        "{:?}",
        running.sim.requests()
    );
    assert_eq!(running.sim.people_count(), 0);
}
