//! Manual segment membership through the Track API, against the simulator.

use cio_client::{CioError, IdType, SegmentType};
use cio_sim::{Fault, SimApi};

use crate::helpers::{client, requests_to, spawn_sim};

#[tokio::test]
async fn add_and_remove_change_the_membership_of_a_manual_segment() {
    let running = spawn_sim().await;
    let client = client(&running);
    let segment = client
        .create_manual_segment("Managed by SharpSend", None)
        .await
        .unwrap();
    assert_eq!(segment.segment_type, SegmentType::Manual);

    let ids: Vec<String> = (1..=1000).map(|n| format!("u{n:05}")).collect();
    client
        .add_to_segment(segment.id, &ids, IdType::Id)
        .await
        .unwrap();
    assert_eq!(running.sim.segment_members(segment.id).unwrap(), ids);
    // Adding again is harmless; unknown ids are ignored.
    client
        .add_to_segment(segment.id, &["u00001", "nobody"], IdType::Id)
        .await
        .unwrap();
    assert_eq!(running.sim.segment_members(segment.id).unwrap().len(), 1000);
    assert_eq!(
        client.segment_customer_count(segment.id).await.unwrap(),
        1000
    );

    client
        .remove_from_segment(segment.id, &ids[..998], IdType::Id)
        .await
        .unwrap();
    assert_eq!(
        running.sim.segment_members(segment.id).unwrap(),
        ids[998..].to_vec()
    );

    // By email: the id_type travels in the query.
    let email = running.sim.person("u00005").unwrap().email.unwrap();
    client
        .add_to_segment(segment.id, &[email.as_str()], IdType::Email)
        .await
        .unwrap();
    assert!(
        running
            .sim
            .segment_members(segment.id)
            .unwrap()
            .contains(&"u00005".to_owned())
    );

    let logged = requests_to(&running, &format!("/api/v1/segments/{}/", segment.id));
    assert_eq!(logged.len(), 4);
    assert!(logged.iter().all(|r| r.method == "POST" && r.status == 200));
    assert_eq!(
        logged[0].path,
        format!("/api/v1/segments/{}/add_customers", segment.id)
    );
    assert_eq!(logged[0].query.as_deref(), Some("id_type=id"));
    assert_eq!(
        logged[0]
            .body
            .as_ref()
            .and_then(|b| b["ids"].as_array())
            .map(Vec::len),
        Some(1000)
    );
    assert_eq!(
        logged[2].path,
        format!("/api/v1/segments/{}/remove_customers", segment.id)
    );
    assert_eq!(logged[3].query.as_deref(), Some("id_type=email"));
}

#[tokio::test]
async fn data_driven_and_unknown_segments_are_rejected_and_limits_checked_before_sending() {
    let running = spawn_sim().await;
    let client = client(&running);
    let dynamic = running
        .sim
        .segments()
        .into_iter()
        .find(|s| s.kind == cio_sim::SegmentKind::Dynamic)
        .unwrap();
    for segment in [dynamic.id, 9999] {
        let err = client
            .add_to_segment(segment, &["u00001"], IdType::Id)
            .await
            .unwrap_err();
        assert!(
            matches!(err, CioError::Rejected { status: 400, .. }),
            "{err:?}"
        );
    }
    let before = running.sim.request_count(SimApi::Track);
    let too_many: Vec<String> = (0..1001).map(|n| n.to_string()).collect();
    for err in [
        client
            .add_to_segment(1, &too_many, IdType::Id)
            .await
            .unwrap_err(),
        client
            .remove_from_segment(1, &[] as &[&str], IdType::Id)
            .await
            .unwrap_err(),
        client
            .add_to_segment(0, &["u00001"], IdType::Id)
            .await
            .unwrap_err(),
    ] {
        assert!(matches!(err, CioError::Config { .. }), "{err:?}");
    }
    assert_eq!(
        running.sim.request_count(SimApi::Track),
        before,
        "an invalid call was sent"
    );
}

#[tokio::test]
async fn membership_changes_are_retried_through_server_errors() {
    let running = spawn_sim().await;
    let client = client(&running);
    let segment = running.sim.create_manual_segment("m", "");
    running.sim.push_faults(
        Some(SimApi::Track),
        [Fault::Status {
            status: 503,
            retry_after_secs: None,
        }],
    );
    client
        .add_to_segment(segment, &["u00002"], IdType::Id)
        .await
        .unwrap();
    assert_eq!(
        running.sim.segment_members(segment).unwrap(),
        vec!["u00002".to_owned()]
    );
    let statuses: Vec<u16> = requests_to(&running, "/api/v1/segments/")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![503, 200]);
}
