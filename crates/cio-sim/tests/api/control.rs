//! The `/_sim/` control API.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{demo_unlimited, empty_unlimited, send, spawn, status_of};
use cio_sim::SimApi;

#[tokio::test]
async fn health_and_people() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = send(t.control(Method::GET, "/_sim/health")).await?;
    assert_eq!(status, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["people"], 5000);
    assert_eq!(
        body["segments"].as_u64(),
        Some(t.sim().segments().len() as u64)
    );

    let (status, body) = send(
        t.control(Method::PUT, "/_sim/people/new-1")
            .json(&json!({"plan": "pro", "email": "n@e.com"})),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(body["person"]["id"], "new-1");
    assert_eq!(body["person"]["email"], "n@e.com");
    // The App API sees it.
    let (status, body) = send(t.app(Method::GET, "/v1/customers/new-1/attributes")).await?;
    assert_eq!(status, 200);
    assert_eq!(body["customer"]["attributes"]["plan"], "pro");

    let (status, body) = send(t.control(Method::GET, "/_sim/people/new-1")).await?;
    assert_eq!(
        (status, &body["person"]["attributes"]["plan"]),
        (200, &json!("pro"))
    );
    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/people/new-1")).await?,
        204
    );
    assert_eq!(
        status_of(t.control(Method::GET, "/_sim/people/new-1")).await?,
        404
    );
    assert_eq!(
        status_of(t.control(Method::PUT, "/_sim/people/x").body("[1]")).await?,
        400
    );
    Ok(())
}

#[tokio::test]
async fn faults_and_rate_limits_over_http() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let (status, body) = send(t.control(Method::POST, "/_sim/faults").json(&json!({
        "api": "app",
        "faults": [
            {"kind": "status", "status": 500},
            {"kind": "status", "status": 429, "retry_after_secs": 3},
            {"kind": "delay", "ms": 10},
            {"kind": "drop"},
            {"kind": "accept_then_drop"}
        ]
    })))
    .await?;
    assert_eq!(status, 200);
    assert_eq!(body["queued"], 5);
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 500);
    let response = t.app(Method::GET, "/v1/segments").send().await?;
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(
        response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert!(t.app(Method::GET, "/v1/segments").send().await.is_err());
    assert_eq!(t.sim().queued_faults(), 1);
    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/faults")).await?,
        204
    );
    assert_eq!(t.sim().queued_faults(), 0);

    // Chaos over HTTP, for the Track API only.
    let chaos = json!({"api": "track", "chaos": {"error_rate": 1.0, "error_status": 503}});
    assert_eq!(
        status_of(t.control(Method::POST, "/_sim/faults").json(&chaos)).await?,
        200
    );
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        503
    );
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/faults")).await?,
        204
    );
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );

    // Invalid specs are rejected and change nothing.
    for bad in [
        json!({"faults": [{"kind": "explode"}]}),
        json!({"faults": [{"kind": "status", "status": 42}]}),
        json!({"chaos": {"error_rate": 2.0}}),
        json!({"api": "both"}),
    ] {
        assert_eq!(
            status_of(t.control(Method::POST, "/_sim/faults").json(&bad)).await?,
            400,
            "{bad}"
        );
    }
    assert_eq!(t.sim().queued_faults(), 0);

    // Rate limits.
    let (status, body) = send(
        t.control(Method::POST, "/_sim/rate-limits")
            .json(&json!({"app": 1})),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({
            "app": 1,
            "track": 0,
            "app_mode": "rolling",
            "track_mode": "rolling",
            "trigger_interval_ms": 10_000,
            "trigger_scope": "workspace",
        })
    );
    assert_eq!(t.sim().rate_limit(SimApi::App), 1);
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 429);
    let (_, body) = send(t.control(Method::GET, "/_sim/rate-limits")).await?;
    assert_eq!(body["app"], 1);
    Ok(())
}

#[tokio::test]
async fn requests_log_over_http() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );
    let (_, body) = send(t.control(Method::GET, "/_sim/requests")).await?;
    assert_eq!(body["requests"].as_array().map(Vec::len), Some(2));
    let (_, body) = send(t.control(Method::GET, "/_sim/requests?api=track")).await?;
    let requests = body["requests"].as_array().cloned().unwrap_or_default();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0]["api"], "track");
    assert_eq!(requests[0]["path"], "/api/v1/accounts/region");
    assert_eq!(requests[0]["status"], 200);
    assert!(requests[0]["at"].is_string());
    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/requests")).await?,
        204
    );
    let (_, body) = send(t.control(Method::GET, "/_sim/requests")).await?;
    assert_eq!(body["requests"], json!([]));
    Ok(())
}

#[tokio::test]
async fn segments_over_http() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = send(t.control(Method::GET, "/_sim/segments")).await?;
    assert_eq!(status, 200);
    let listed = body["segments"].as_array().cloned().unwrap_or_default();
    assert_eq!(listed.len(), t.sim().segments().len());
    assert!(
        listed.iter().all(
            |s| s["member_count"].is_u64() && (s["kind"] == "dynamic" || s["kind"] == "manual")
        )
    );

    // A dynamic segment from a predicate.
    let create = json!({"name": "Whales", "description": "big", "predicate": {"gte": ["portfolio_size_usd", 2000000]}});
    let (status, body) = send(t.control(Method::POST, "/_sim/segments").json(&create)).await?;
    assert_eq!(status, 201);
    assert_eq!(body["segment"]["kind"], "dynamic");
    let id = body["segment"]["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("id"))?;
    let (_, app_view) = send(t.app(Method::GET, &format!("/v1/segments/{id}"))).await?;
    assert_eq!(app_view["segment"]["type"], "dynamic");
    let (_, detail) = send(t.control(Method::GET, &format!("/_sim/segments/{id}"))).await?;
    let members = detail["members"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default() as u64;
    assert_eq!(detail["segment"]["member_count"].as_u64(), Some(members));

    // Control may delete any kind, including data-driven ones.
    assert_eq!(
        status_of(t.control(Method::DELETE, &format!("/_sim/segments/{id}"))).await?,
        204
    );
    assert_eq!(
        status_of(t.app(Method::GET, &format!("/v1/segments/{id}"))).await?,
        404
    );
    assert_eq!(
        status_of(t.control(Method::DELETE, &format!("/_sim/segments/{id}"))).await?,
        404
    );
    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/segments/x")).await?,
        404
    );

    let (status, body) = send(
        t.control(Method::POST, "/_sim/segments")
            .json(&json!({"name": "Manual"})),
    )
    .await?;
    assert_eq!(
        (status, body["segment"]["kind"].clone()),
        (201, Value::from("manual"))
    );
    assert_eq!(
        status_of(
            t.control(Method::POST, "/_sim/segments")
                .json(&json!({"description": "no name"}))
        )
        .await?,
        400
    );
    Ok(())
}
