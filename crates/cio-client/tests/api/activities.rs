//! The activity feed against the simulator: attribute changes from the Track API and from
//! elsewhere, paged and streamed, per person, and an incremental read.

use std::time::Duration;

use cio_client::{
    ActivityQuery, ActivityType, AttributeChange, CioError, IdType, Identifier, PersonAction,
    PersonOp,
};
use futures::TryStreamExt as _;
use serde_json::{Map, Value, json};

use crate::helpers::{client, spawn_empty_sim};

fn attrs(v: Value) -> Map<String, Value> {
    v.as_object().cloned().unwrap_or_default()
}

#[tokio::test]
async fn attribute_changes_from_the_track_api_and_from_elsewhere() {
    let sim = spawn_empty_sim().await;
    let client = client(&sim);
    client
        .identify("u1", &attrs(json!({"email": "u1@x.io", "plan": "free"})))
        .await
        .unwrap();
    client
        .entity(&PersonOp {
            identifier: Identifier::Id("u1".into()),
            action: PersonAction::Identify {
                attributes: attrs(json!({"plan": "pro"})),
            },
        })
        .await
        .unwrap();
    assert!(sim.change_attributes("u1", attrs(json!({"plan": "premium"}))));

    let plans: Vec<AttributeChange> = client
        .activities(
            ActivityQuery::new()
                .of_type(ActivityType::AttributeChange)
                .named("plan"),
        )
        .map_ok(|a| a.attribute_changes())
        .try_concat()
        .await
        .unwrap();
    let story: Vec<(&str, &str)> = plans
        .iter()
        .rev()
        .map(|c| (c.from.as_str(), c.to.as_str()))
        .collect();
    assert_eq!(
        story,
        vec![("", "free"), ("free", "pro"), ("pro", "premium")]
    );

    // One person's history through both routes.
    let mine: Vec<_> = client
        .customer_activities("u1@x.io", IdType::Email, ActivityQuery::new().with_limit(2))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(mine.len(), 5, "id, email, and three plan changes");
    assert!(mine.iter().all(|a| a.customer_id.as_deref() == Some("u1")));
    let same: Vec<_> = client
        .activities(ActivityQuery::new().for_customer("u1", IdType::Id))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(same, mine);
    let unknown = client
        .customer_activities_page("ghost", IdType::Id, &ActivityQuery::new(), None)
        .await
        .unwrap_err();
    assert!(matches!(unknown, CioError::NotFound { .. }), "{unknown:?}");
    let too_big = client
        .activities_page(&ActivityQuery::new().with_limit(101), None)
        .await
        .unwrap_err();
    assert!(matches!(too_big, CioError::Config { .. }));
    assert!(
        sim.requests()
            .iter()
            .all(|r| !r.query.as_deref().unwrap_or("").contains("limit=101"))
    );
}

#[tokio::test]
async fn an_incremental_reader_stops_at_what_it_has_seen() {
    let sim = spawn_empty_sim().await;
    let client = client(&sim);
    for i in 0..30 {
        sim.upsert_person(&format!("p{i}"), attrs(json!({"v": 1})));
    }
    let query = ActivityQuery::new().of_type(ActivityType::AttributeChange);
    let first = client.activities_page(&query, None).await.unwrap();
    let newest_seen = first.items[0].id.clone();

    sim.advance(Duration::from_secs(60));
    for i in 0..3 {
        assert!(sim.change_attributes(&format!("p{i}"), attrs(json!({"v": 2}))));
    }
    // Read from the top until the last activity seen.
    let new: Vec<_> = client
        .activities(query)
        .try_take_while(|a| futures::future::ready(Ok(a.id != newest_seen)))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(new.len(), 3);
    for a in &new {
        assert_eq!(
            a.attribute_changes(),
            vec![AttributeChange {
                name: "v".into(),
                from: "1".into(),
                to: "2".into()
            }]
        );
    }
}
