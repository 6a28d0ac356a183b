//! App API customer reads against the demo workspace.

use std::collections::BTreeSet;

use cio_client::{Api, CioError, IdType, MAX_CUSTOMERS_PER_LOOKUP};
use serde_json::Value;

use crate::helpers::{client, requests_to, spawn_sim};

/// What the App API shows for an attribute: Customer.io stores every value as a string.
fn as_shown(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[tokio::test]
async fn customer_attributes_by_id_email_and_cio_id() {
    let running = spawn_sim().await;
    let client = client(&running);
    let person = running.sim.person("u00001").unwrap();
    let email = person.email.clone().unwrap();

    let by_id = client
        .customer_attributes("u00001", IdType::Id)
        .await
        .unwrap();
    assert_eq!(by_id.id.as_deref(), Some("u00001"));
    assert_eq!(by_id.identifiers.id.as_deref(), Some("u00001"));
    assert_eq!(by_id.identifiers.email.as_deref(), Some(email.as_str()));
    assert_eq!(
        by_id.identifiers.cio_id.as_deref(),
        Some(person.cio_id.as_str())
    );
    for (name, value) in &person.attributes {
        assert_eq!(
            by_id.attribute(name),
            Some(as_shown(value).as_str()),
            "attribute {name}"
        );
    }
    assert!(by_id.unsubscribed.is_some());

    let by_email = client
        .customer_attributes(&email, IdType::Email)
        .await
        .unwrap();
    assert_eq!(by_email, by_id);
    let by_cio = client
        .customer_attributes(&person.cio_id, IdType::CioId)
        .await
        .unwrap();
    assert_eq!(by_cio, by_id);

    let logged = requests_to(&running, "/v1/customers/");
    assert_eq!(logged[0].path, "/v1/customers/u00001/attributes");
    assert_eq!(logged[0].query.as_deref(), Some("id_type=id"));
    assert_eq!(logged[1].query.as_deref(), Some("id_type=email"));
    assert!(logged[1].path.contains("%40"), "{}", logged[1].path);
    assert_eq!(logged[2].query.as_deref(), Some("id_type=cio_id"));
}

#[tokio::test]
async fn unknown_customer_is_not_found() {
    let running = spawn_sim().await;
    let client = client(&running);
    let err = client
        .customer_attributes("nobody", IdType::Id)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CioError::NotFound {
                api: Api::App,
                endpoint: "/v1/customers/{customer_id}/attributes"
            }
        ),
        "{err:?}"
    );
    assert!(!err.to_string().contains("nobody"));
    let err = client
        .customer_segments("nobody@example.com", IdType::Email)
        .await
        .unwrap_err();
    assert!(matches!(err, CioError::NotFound { .. }), "{err:?}");
    // Not retried.
    assert_eq!(requests_to(&running, "/v1/customers/").len(), 2);
}

#[tokio::test]
async fn customer_segments_match_segment_membership() {
    let running = spawn_sim().await;
    let client = client(&running);
    let segments = running.sim.segments();
    let person_id = "u00002";
    let expected: BTreeSet<i64> = segments
        .iter()
        .filter(|s| {
            running
                .sim
                .segment_members(s.id)
                .unwrap()
                .iter()
                .any(|m| m == person_id)
        })
        .map(|s| s.id)
        .collect();
    let got = client
        .customer_segments(person_id, IdType::Id)
        .await
        .unwrap();
    let got_ids: BTreeSet<i64> = got.iter().map(|s| s.id).collect();
    assert_eq!(got_ids, expected);
    for segment in &got {
        let sim = segments.iter().find(|s| s.id == segment.id).unwrap();
        assert_eq!(segment.name, sim.name);
    }
}

#[tokio::test]
async fn customers_attributes_for_100_ids_in_one_request() {
    let running = spawn_sim().await;
    let client = client(&running);
    let mut ids: Vec<String> = (1..=98).map(|n| format!("u{n:05}")).collect();
    ids.push("missing-1".to_owned());
    ids.push("missing-2".to_owned());
    assert_eq!(ids.len(), MAX_CUSTOMERS_PER_LOOKUP);

    let customers = client.customers_attributes(&ids).await.unwrap();
    // Unknown ids are left out.
    assert_eq!(customers.len(), 98);
    let got: BTreeSet<String> = customers
        .iter()
        .map(|c| c.identifiers.id.clone().unwrap())
        .collect();
    let want: BTreeSet<String> = ids[..98].iter().cloned().collect();
    assert_eq!(got, want);
    let first = customers
        .iter()
        .find(|c| c.identifiers.id.as_deref() == Some("u00001"))
        .unwrap();
    let person = running.sim.person("u00001").unwrap();
    assert_eq!(
        first.identifiers.cio_id.as_deref(),
        Some(person.cio_id.as_str())
    );

    let logged = requests_to(&running, "/v1/customers/attributes");
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].method, "POST");
    assert_eq!(
        logged[0].body.as_ref().unwrap()["ids"]
            .as_array()
            .unwrap()
            .len(),
        100
    );

    // 101 ids: refused before sending; none: nothing to ask.
    ids.push("u00099".to_owned());
    let err = client.customers_attributes(&ids).await.unwrap_err();
    assert!(matches!(err, CioError::Config { .. }), "{err:?}");
    assert!(client.customers_attributes(&[]).await.unwrap().is_empty());
    assert_eq!(requests_to(&running, "/v1/customers/attributes").len(), 1);
}

#[tokio::test]
async fn find_customers_by_email() {
    let running = spawn_sim().await;
    let client = client(&running);
    let person = running.sim.person("u00003").unwrap();
    let email = person.email.clone().unwrap();
    let found = client.find_customers_by_email(&email).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].id.as_deref(), Some("u00003"));
    assert_eq!(found[0].email.as_deref(), Some(email.as_str()));
    assert_eq!(found[0].cio_id.as_deref(), Some(person.cio_id.as_str()));

    assert!(
        client
            .find_customers_by_email("nobody@example.com")
            .await
            .unwrap()
            .is_empty()
    );
    let logged = requests_to(&running, "/v1/customers");
    assert_eq!(logged[0].path, "/v1/customers");
    assert!(
        logged[0].query.as_deref().unwrap().starts_with("email="),
        "{:?}",
        logged[0].query
    );
}
