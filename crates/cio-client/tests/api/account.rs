//! Telling wrong Track credentials from a wrong region (`check_account`), and how ordinary
//! calls fail on the wrong region.

use cio_client::{AccountCheckError, Api, CioClient, CioError, Region};
use cio_sim::{SimConfig, Simulator};
use serde_json::Map;

use crate::helpers::{config, init_tracing};

async fn sim(region: &str, endpoint_region: &str) -> cio_sim::RunningSim {
    init_tracing();
    Simulator::spawn(SimConfig {
        region: region.into(),
        endpoint_region: Some(endpoint_region.into()),
        ..SimConfig::empty()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn right_credentials_and_region_pass() {
    for (region, client_region) in [("us", Region::Us), ("eu", Region::Eu)] {
        let running = sim(region, region).await;
        let mut cfg = config(&running);
        cfg.region = client_region;
        let account = CioClient::new(cfg).unwrap().check_account().await.unwrap();
        assert_eq!(account.region, client_region);
        assert!(account.environment_id > 0);
    }
}

#[tokio::test]
async fn a_wrong_track_key_or_site_id_is_named_as_such() {
    let running = sim("eu", "us").await;
    for (site_id, key) in [(None, Some("wrong-key")), (Some("wrong-site"), None)] {
        let mut cfg = config(&running);
        if let Some(key) = key {
            cfg.credentials.track_api_key = key.into();
        }
        if let Some(site) = site_id {
            cfg.credentials.site_id = site.into();
        }
        let err = CioClient::new(cfg)
            .unwrap()
            .check_account()
            .await
            .unwrap_err();
        // Even though the region is wrong too: credentials come first.
        assert!(
            matches!(err, AccountCheckError::TrackCredentials { status: 401 }),
            "{err:?}"
        );
        assert!(err.to_string().contains("Track API key"), "{err}");
        assert!(!err.to_string().contains("wrong-key"), "{err}");
    }
}

#[tokio::test]
async fn a_workspace_in_the_other_region_is_named_as_such() {
    // An EU workspace called through the US hosts (the client configured for the US).
    let running = sim("eu", "us").await;
    let client = CioClient::new(config(&running)).unwrap();
    let err = client.check_account().await.unwrap_err();
    match &err {
        AccountCheckError::WrongRegion {
            configured,
            workspace,
            track_url,
        } => {
            assert_eq!((*configured, *workspace), (Region::Us, Region::Eu));
            assert_eq!(track_url, "https://track-eu.customer.io");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("eu region"), "{err}");
    // What ordinary calls see meanwhile: a redirect (not followed: nothing stored) and 401s.
    let identify = client.identify("u1", &Map::new()).await.unwrap_err();
    assert!(
        matches!(identify, CioError::Rejected { status: 307, .. }),
        "{identify:?}"
    );
    assert!(running.sim.person("u1").is_none());
    let read = client.list_segments().await.unwrap_err();
    assert!(
        matches!(
            read,
            CioError::Unauthorized {
                api: Api::App,
                status: 401
            }
        ),
        "{read:?}"
    );

    // A US workspace called through the EU hosts: Track refuses too, the check still tells.
    let running = sim("us", "eu").await;
    let mut cfg = config(&running);
    cfg.region = Region::Eu;
    let client = CioClient::new(cfg).unwrap();
    let identify = client.identify("u1", &Map::new()).await.unwrap_err();
    assert!(
        matches!(
            identify,
            CioError::Unauthorized {
                api: Api::Track,
                ..
            }
        ),
        "{identify:?}"
    );
    assert!(matches!(
        client.check_account().await.unwrap_err(),
        AccountCheckError::WrongRegion {
            configured: Region::Eu,
            workspace: Region::Us,
            ..
        }
    ));
}

#[tokio::test]
async fn an_unreachable_check_is_not_blamed_on_the_credentials() {
    let running = sim("us", "us").await;
    running.sim.push_faults(
        Some(cio_sim::SimApi::Track),
        (0..4).map(|_| cio_sim::Fault::Status {
            status: 503,
            retry_after_secs: None,
        }),
    );
    let err = CioClient::new(config(&running))
        .unwrap()
        .check_account()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AccountCheckError::Unavailable(CioError::Server { status: 503, .. })
        ),
        "{err:?}"
    );
}
