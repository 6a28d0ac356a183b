//! The typed calls against the simulator, and the error each status maps to.

use cio_client::{Api, CioClient, CioError, Credentials, Region, SegmentType};
use cio_sim::{Fault, SimApi};
use futures::TryStreamExt as _;

use crate::helpers::{client, config, requests_to, spawn_empty_sim, spawn_sim};

#[tokio::test]
async fn account_region_reports_region_and_workspace() {
    let running = spawn_empty_sim().await;
    let region = client(&running).account_region().await.unwrap();
    assert_eq!(region.region, Region::Us);
    assert_eq!(region.url, "https://track.customer.io");
    assert!(region.environment_id > 0);
    let logged = requests_to(&running, "/api/v1/accounts/region");
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].method, "GET");
    assert_eq!(logged[0].status, 200);
}

#[tokio::test]
async fn segments_list_get_and_count_match_the_simulator() {
    let running = spawn_sim().await;
    let client = client(&running);
    let listed = client.list_segments().await.unwrap();
    let expected = running.sim.segments();
    assert_eq!(listed.len(), expected.len());
    assert!(!listed.is_empty(), "demo workspace has segments");
    for (got, want) in listed.iter().zip(&expected) {
        assert_eq!(got.id, want.id);
        assert_eq!(got.name, want.name);
    }

    let first = &expected[0];
    let segment = client.get_segment(first.id).await.unwrap();
    assert_eq!(segment.name, first.name);
    assert_eq!(segment.state.as_deref(), Some("finished"));
    assert_eq!(
        client.segment_customer_count(first.id).await.unwrap(),
        first.member_count
    );
}

#[tokio::test]
async fn membership_pages_and_stream_cover_every_member() {
    let running = spawn_sim().await;
    let client = client(&running);
    let segment = running
        .sim
        .segments()
        .into_iter()
        .filter(|s| s.member_count > 0)
        .max_by_key(|s| s.member_count)
        .unwrap();
    let mut expected = running.sim.segment_members(segment.id).unwrap();
    expected.sort();

    let page = client
        .segment_membership_page(segment.id, None, 7)
        .await
        .unwrap();
    assert_eq!(page.identifiers.len(), 7.min(expected.len()));
    assert!(page.next.is_some() || expected.len() <= 7);

    // Big pages to keep the number of paced requests small.
    let page_size = u32::try_from(segment.member_count / 3 + 1).unwrap();
    let members: Vec<_> = client
        .segment_membership(segment.id, page_size)
        .try_collect()
        .await
        .unwrap();
    let mut ids: Vec<String> = members
        .iter()
        .map(|m| {
            m.id.clone()
                .unwrap_or_else(|| format!("cio_{}", m.cio_id.clone().unwrap()))
        })
        .collect();
    ids.sort();
    assert_eq!(ids, expected);
    let pages = requests_to(&running, &format!("/v1/segments/{}/membership", segment.id));
    // The 7-item page, then 3 or 4 pages of the stream.
    assert!((4..=5).contains(&pages.len()), "{} requests", pages.len());
    assert!(pages[2].query.as_deref().unwrap().contains("start="));
}

#[tokio::test]
async fn manual_segment_create_then_delete() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let created = client
        .create_manual_segment("Gold readers", Some("from the test"))
        .await
        .unwrap();
    assert_eq!(created.segment_type, SegmentType::Manual);
    assert_eq!(created.name, "Gold readers");
    assert_eq!(created.description.as_deref(), Some("from the test"));
    let logged = requests_to(&running, "/v1/segments");
    assert_eq!(
        logged[0].body,
        Some(serde_json::json!({"segment":{"name":"Gold readers","description":"from the test"}}))
    );
    assert_eq!(running.sim.segments().len(), 1);

    client.delete_segment(created.id).await.unwrap();
    assert!(running.sim.segments().is_empty());
    let err = client.get_segment(created.id).await.unwrap_err();
    assert!(
        matches!(
            err,
            CioError::NotFound {
                api: Api::App,
                endpoint: "/v1/segments/{segment_id}"
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.status(), Some(404));
    // The error names the template, never the concrete path.
    assert!(
        !err.to_string()
            .contains(&format!("/v1/segments/{}", created.id))
    );
}

#[tokio::test]
async fn bad_request_is_rejected_with_customer_io_details() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    let err = client.create_manual_segment("  ", None).await.unwrap_err();
    let CioError::Rejected {
        api,
        status,
        details,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!((*api, *status), (Api::App, 400));
    assert_eq!(details[0].field.as_deref(), Some("/segment/name"));
    assert!(details[0].message.contains("blank"), "{details:?}");
    assert!(!err.is_retryable());

    // A 400 on an idempotent call is not retried either.
    running.sim.push_faults(
        Some(SimApi::App),
        [Fault::Status {
            status: 400,
            retry_after_secs: None,
        }],
    );
    running.sim.clear_requests();
    let err = client.list_segments().await.unwrap_err();
    assert_eq!(err.status(), Some(400));
    assert_eq!(err.details().len(), 1);
    assert_eq!(requests_to(&running, "/v1/").len(), 1);
}

#[tokio::test]
async fn wrong_keys_are_unauthorized_on_both_apis() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.credentials = Credentials::new("sim-site", "wrong-track", "wrong-app");
    let client = CioClient::new(cfg).unwrap();

    let err = client.account_region().await.unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Unauthorized {
                api: Api::Track,
                status: 401
            }
        ),
        "{err:?}"
    );
    let err = client.list_segments().await.unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Unauthorized {
                api: Api::App,
                status: 401
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    for text in [format!("{err}"), format!("{err:?}"), format!("{client:?}")] {
        assert!(
            !text.contains("wrong-app") && !text.contains("wrong-track"),
            "{text}"
        );
    }
    // Not retried.
    assert_eq!(running.sim.requests().len(), 2);
}

#[tokio::test]
async fn unknown_segment_is_not_found_everywhere() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    assert!(matches!(
        client.segment_customer_count(999).await.unwrap_err(),
        CioError::NotFound {
            endpoint: "/v1/segments/{segment_id}/customer_count",
            ..
        }
    ));
    assert!(matches!(
        client
            .segment_membership_page(999, None, 10)
            .await
            .unwrap_err(),
        CioError::NotFound { .. }
    ));
    assert!(matches!(
        client.delete_segment(999).await.unwrap_err(),
        CioError::NotFound { .. }
    ));
    let stream_err: Result<Vec<_>, _> = client.segment_membership(999, 10).try_collect().await;
    assert!(matches!(stream_err, Err(CioError::NotFound { .. })));
}
