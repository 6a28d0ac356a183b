//! Rate limits, one-shot faults, chaos and the request log.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::helpers::{empty_unlimited, send, spawn, status_of};
use cio_sim::{Chaos, Fault, RateLimitMode, SimApi, SimConfig};

#[tokio::test]
async fn app_rate_limit_answers_429_with_retry_after() -> anyhow::Result<()> {
    let t = spawn(SimConfig {
        app_rate_limit_per_sec: 3,
        ..SimConfig::empty()
    })
    .await?;
    for _ in 0..3 {
        assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    }
    let response = t.app(Method::GET, "/v1/segments").send().await?;
    assert_eq!(response.status().as_u16(), 429);
    let retry_after: u64 = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("Retry-After missing"))?;
    assert!((1..=2).contains(&retry_after));
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["errors"][0]["status"], "429");
    assert!(
        body["errors"][0]["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("rate limited to 3 requests per 1s")),
        "{body}"
    );
    // Rate-limited requests are logged with their status.
    let statuses: Vec<u16> = t.sim().requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429]);

    // A rolling window (the default): refused until the first request is a second old.
    t.sim().advance(Duration::from_millis(400));
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 429);
    t.sim().advance(Duration::from_millis(700));
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);

    // A token bucket starts full and refills continuously: a token is back after 1/3 s.
    let (status, limits) = send(
        t.control(Method::POST, "/_sim/rate-limits")
            .json(&serde_json::json!({"app_mode": "token_bucket"})),
    )
    .await?;
    assert_eq!(
        (status, &limits["app_mode"]),
        (200, &serde_json::json!("token_bucket"))
    );
    assert_eq!(
        t.sim().rate_limit_mode(SimApi::App),
        RateLimitMode::TokenBucket
    );
    assert_eq!(
        t.sim().rate_limit_mode(SimApi::Track),
        RateLimitMode::Rolling
    );
    for _ in 0..3 {
        assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    }
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 429);
    t.sim().advance(Duration::from_millis(400));
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);

    // Control requests are never limited.
    for _ in 0..10 {
        assert_eq!(
            status_of(t.control(Method::GET, "/_sim/health")).await?,
            200
        );
    }
    // Limit changed at run time: 0 = unlimited.
    t.sim().set_rate_limit(SimApi::App, 0);
    for _ in 0..20 {
        assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    }
    Ok(())
}

#[tokio::test]
async fn status_faults_are_consumed_in_order() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    t.sim().push_faults(
        Some(SimApi::App),
        [
            Fault::Status {
                status: 503,
                retry_after_secs: None,
            },
            Fault::Status {
                status: 429,
                retry_after_secs: Some(7),
            },
        ],
    );
    // A Track request does not consume App faults.
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );

    let response = t.app(Method::GET, "/v1/segments").send().await?;
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().get("retry-after").is_none());
    let body: serde_json::Value = response.json().await?;
    assert_eq!(body["errors"][0]["status"], "503");

    let response = t.app(Method::GET, "/v1/segments").send().await?;
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("7")
    );
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);

    // A faulted request is not processed.
    t.sim().push_faults(
        None,
        [Fault::Status {
            status: 500,
            retry_after_secs: None,
        }],
    );
    let (status, body) = send(
        t.track(Method::PUT, "/api/v1/customers/u1")
            .json(&json!({"a": 1})),
    )
    .await?;
    assert_eq!(status, 500);
    assert!(body["meta"]["errors"].is_array(), "Track shape: {body}");
    assert!(t.sim().person("u1").is_none());
    Ok(())
}

#[tokio::test]
async fn delay_fault_then_normal_answer() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    t.sim()
        .push_faults(None, [Fault::Delay(Duration::from_millis(300))]);
    let started = Instant::now();
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert!(started.elapsed() < Duration::from_millis(300));

    // A client timeout shorter than the delay sees a timeout.
    t.sim()
        .push_faults(None, [Fault::Delay(Duration::from_millis(800))]);
    let err = t
        .app(Method::GET, "/v1/segments")
        .timeout(Duration::from_millis(200))
        .send()
        .await
        .err()
        .ok_or_else(|| anyhow::anyhow!("expected a timeout"))?;
    assert!(err.is_timeout(), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn drop_closes_the_connection_without_a_response() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    // Warm a pooled keep-alive connection first: the drop must still surface as an error.
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    t.sim().push_faults(None, [Fault::Drop]);
    let result = t
        .track(Method::PUT, "/api/v1/customers/dropped")
        .json(&json!({"a": 1}))
        .send()
        .await;
    let err = result
        .err()
        .ok_or_else(|| anyhow::anyhow!("a dropped request must not get a response"))?;
    assert!(err.status().is_none(), "transport error, not HTTP: {err:?}");
    assert!(!err.is_timeout(), "{err:?}");
    // Not processed.
    assert!(t.sim().person("dropped").is_none());
    // The next request works.
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);

    let log = t.sim().requests();
    let dropped = log
        .iter()
        .find(|r| r.path == "/api/v1/customers/dropped")
        .ok_or_else(|| anyhow::anyhow!("dropped request logged"))?;
    assert_eq!(dropped.status, 0);
    assert_eq!(dropped.api, SimApi::Track);
    Ok(())
}

#[tokio::test]
async fn accept_then_drop_processes_but_never_answers() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    t.sim()
        .push_faults(Some(SimApi::Track), [Fault::AcceptThenDrop]);
    let result = t
        .track(Method::PUT, "/api/v1/customers/accepted")
        .json(&json!({"plan": "pro"}))
        .send()
        .await;
    let err = result
        .err()
        .ok_or_else(|| anyhow::anyhow!("no response expected"))?;
    assert!(err.status().is_none(), "{err:?}");
    // The state change happened anyway: this is what makes blind retries dangerous.
    let person = t.sim().person("accepted");
    assert_eq!(
        person.map(|p| p.attributes["plan"].clone()),
        Some(json!("pro"))
    );
    assert_eq!(t.sim().requests().last().map(|r| r.status), Some(0));
    assert_eq!(t.sim().queued_faults(), 0);
    Ok(())
}

#[tokio::test]
async fn accept_then_delay_processes_before_a_caller_that_gives_up_learns_it() -> anyhow::Result<()>
{
    let t = spawn(empty_unlimited()).await?;
    t.sim().push_faults(
        Some(SimApi::Track),
        [Fault::AcceptThenDelay(Duration::from_secs(5))],
    );
    let started = Instant::now();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(500),
        t.track(Method::PUT, "/api/v1/customers/slow")
            .json(&json!({"plan": "pro"}))
            .send(),
    )
    .await;
    assert!(gave_up.is_err(), "no answer within the delay");
    assert!(started.elapsed() < Duration::from_secs(2));
    // Processed already, though the caller never heard back.
    let person = t.sim().person("slow");
    assert_eq!(
        person.map(|p| p.attributes["plan"].clone()),
        Some(json!("pro"))
    );
    Ok(())
}

#[tokio::test]
async fn chaos_applies_until_cleared() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    t.sim().set_chaos(
        Some(SimApi::App),
        Chaos {
            error_rate: 1.0,
            error_status: 502,
            ..Chaos::default()
        },
    );
    for _ in 0..3 {
        assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 502);
    }
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );
    // Queued faults take precedence over chaos.
    t.sim().push_faults(
        None,
        [Fault::Status {
            status: 418,
            retry_after_secs: None,
        }],
    );
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 418);

    t.sim().set_chaos(
        None,
        Chaos {
            drop_rate: 1.0,
            latency: Duration::from_millis(50),
            ..Chaos::default()
        },
    );
    let started = Instant::now();
    assert!(
        t.track(Method::GET, "/api/v1/accounts/region")
            .send()
            .await
            .is_err()
    );
    assert!(started.elapsed() >= Duration::from_millis(50));

    t.sim().clear_faults();
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );
    Ok(())
}

#[tokio::test]
async fn request_log_records_raw_requests() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let put = t
        .track(Method::PUT, "/api/v1/customers/a%40b.com")
        .json(&json!({"plan": "pro"}));
    assert_eq!(status_of(put).await?, 200);
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/segments/1/membership?limit=5")).await?,
        404
    );
    assert_eq!(
        status_of(t.control(Method::GET, "/v1/segments")).await?,
        401
    );
    assert_eq!(
        status_of(t.control(Method::GET, "/_sim/health")).await?,
        200
    );

    let log = t.sim().requests();
    assert_eq!(log.len(), 3, "control requests are not logged: {log:?}");
    assert_eq!(log[0].api, SimApi::Track);
    assert_eq!(log[0].method, "PUT");
    assert_eq!(log[0].path, "/api/v1/customers/a%40b.com");
    assert_eq!(log[0].body, Some(json!({"plan": "pro"})));
    assert_eq!(log[0].status, 200);
    assert_eq!(log[1].api, SimApi::App);
    assert_eq!(log[1].query.as_deref(), Some("limit=5"));
    assert_eq!(log[1].status, 404);
    assert!(log[1].body.is_none());
    assert_eq!(log[2].status, 401);
    assert!(log[0].at <= log[1].at && log[1].at <= log[2].at);

    t.sim().clear_requests();
    assert!(t.sim().requests().is_empty());
    Ok(())
}

#[tokio::test]
async fn shutdown_stops_serving() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let url = t.url("/_sim/health");
    assert_eq!(
        status_of(t.control(Method::GET, "/_sim/health")).await?,
        200
    );
    let crate::helpers::TestSim {
        running, client, ..
    } = t;
    tokio::time::timeout(Duration::from_secs(5), running.shutdown()).await?;
    let fresh = reqwest::Client::new();
    assert!(fresh.get(&url).send().await.is_err());
    drop(client);
    Ok(())
}
