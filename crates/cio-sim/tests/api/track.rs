//! Track API: auth, region, identify, manual-segment membership.

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::helpers::{demo_unlimited, empty_unlimited, send, spawn, status_of};
use cio_sim::{SimApi, SimConfig};

#[tokio::test]
async fn track_requires_basic_auth() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let path = "/api/v1/accounts/region";

    let (status, body) = send(t.control(Method::GET, path)).await?;
    assert_eq!(status, 401);
    assert!(body["meta"]["errors"][0].is_string(), "{body}");

    let wrong_key = t
        .control(Method::GET, path)
        .basic_auth("sim-site", Some("nope"));
    assert_eq!(status_of(wrong_key).await?, 401);
    let wrong_site = t
        .control(Method::GET, path)
        .basic_auth("other", Some("sim-track-key"));
    assert_eq!(status_of(wrong_site).await?, 401);
    // App credentials are not Track credentials.
    let bearer = t
        .control(Method::GET, path)
        .header("Authorization", "Bearer sim-app-key");
    assert_eq!(status_of(bearer).await?, 401);

    assert_eq!(status_of(t.track(Method::GET, path)).await?, 200);
    // Unknown Track route: 404 in the Track shape.
    let (status, body) = send(t.track(Method::GET, "/api/v1/nope")).await?;
    assert_eq!(status, 404);
    assert!(body["meta"]["errors"].is_array(), "{body}");
    Ok(())
}

#[tokio::test]
async fn a_client_on_the_wrong_region_is_redirected_or_refused() -> anyhow::Result<()> {
    let t = spawn(SimConfig {
        region: "eu".into(),
        endpoint_region: Some("us".into()),
        ..empty_unlimited()
    })
    .await?;
    assert_eq!((t.sim().region(), t.sim().endpoint_region()), ("eu", "us"));
    // The region check answers on either region's host, with valid credentials only.
    let (status, body) = send(t.track(Method::GET, "/api/v1/accounts/region")).await?;
    assert_eq!((status, &body["region"]), (200, &json!("eu")));
    let bad = t
        .client
        .get(t.url("/api/v1/accounts/region"))
        .basic_auth(&t.sim().config().site_id, Some("wrong-key"));
    assert_eq!(status_of(bad).await?, 401);
    // Track on the US host: redirected to the EU host (not followed), nothing stored.
    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let config = t.sim().config();
    let response = no_redirects
        .put(t.url("/api/v1/customers/u1?x=1"))
        .basic_auth(&config.site_id, Some(&config.track_api_key))
        .json(&json!({"plan": "gold"}))
        .send()
        .await?;
    assert_eq!(response.status().as_u16(), 307);
    assert_eq!(
        response.headers()["location"],
        "https://track-eu.customer.io/api/v1/customers/u1?x=1"
    );
    assert!(t.sim().person("u1").is_none());
    // Bad credentials are still a 401, not a redirect.
    let bad = no_redirects
        .put(t.url("/api/v1/customers/u1"))
        .basic_auth(&config.site_id, Some("wrong-key"))
        .json(&json!({}));
    assert_eq!(status_of(bad).await?, 401);
    // The App API key is unknown on the other region's host.
    let (status, body) = send(t.app(Method::GET, "/v1/segments")).await?;
    assert_eq!(status, 401, "{body}");

    // Back on the workspace's own region (null): everything answers.
    let (status, settings) = send(
        t.control(Method::POST, "/_sim/workspace")
            .json(&json!({"endpoint_region": null})),
    )
    .await?;
    assert_eq!((status, &settings["endpoint_region"]), (200, &json!("eu")));
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);

    // Playing the EU host for a US workspace: Track is refused, not redirected.
    let us = spawn(SimConfig {
        endpoint_region: Some("EU".into()),
        ..empty_unlimited()
    })
    .await?;
    let put = us
        .track(Method::PUT, "/api/v1/customers/u1")
        .json(&json!({}));
    assert_eq!(status_of(put).await?, 401);
    let (status, body) = send(us.track(Method::GET, "/api/v1/accounts/region")).await?;
    assert_eq!((status, &body["region"]), (200, &json!("us")));
    let (status, _) = send(
        us.control(Method::POST, "/_sim/workspace")
            .json(&json!({"endpoint_region": "mars"})),
    )
    .await?;
    assert_eq!(status, 400);
    us.sim().set_endpoint_region(Some("us"))?;
    let put = us
        .track(Method::PUT, "/api/v1/customers/u1")
        .json(&json!({}));
    assert_eq!(status_of(put).await?, 200);
    Ok(())
}

#[tokio::test]
async fn region_reports_configured_region() -> anyhow::Result<()> {
    let us = spawn(empty_unlimited()).await?;
    let (status, body) = send(us.track(Method::GET, "/api/v1/accounts/region")).await?;
    assert_eq!(status, 200);
    assert_eq!(body["region"], "us");
    assert_eq!(body["url"], "https://track.customer.io");
    assert!(body["environment_id"].as_u64().is_some_and(|n| n > 0));

    let eu = spawn(SimConfig {
        region: "eu".into(),
        ..empty_unlimited()
    })
    .await?;
    let (_, body) = send(eu.track(Method::GET, "/api/v1/accounts/region")).await?;
    assert_eq!(body["region"], "eu");
    assert_eq!(body["url"], "https://track-eu.customer.io");
    Ok(())
}

#[tokio::test]
async fn identify_creates_merges_and_removes() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let put = |id: &str, body: Value| {
        t.track(Method::PUT, &format!("/api/v1/customers/{id}"))
            .json(&body)
    };

    let (status, body) = send(put(
        "u1",
        json!({"email":"One@Example.com","plan":"free","score":10}),
    ))
    .await?;
    assert_eq!((status, body), (200, json!({})));
    let p = t
        .sim()
        .person("u1")
        .ok_or_else(|| anyhow::anyhow!("u1 missing"))?;
    assert_eq!(p.email.as_deref(), Some("One@Example.com"));
    assert_eq!(p.attributes["plan"], "free");
    assert!(!p.cio_id.is_empty());

    // Merge: new attribute added, existing kept, changed one updated, null removes.
    assert_eq!(
        status_of(put("u1", json!({"plan":"pro","city":"Oslo","score":null}))).await?,
        200
    );
    let p = t
        .sim()
        .person("u1")
        .ok_or_else(|| anyhow::anyhow!("u1 missing"))?;
    assert_eq!(p.attributes["plan"], "pro");
    assert_eq!(p.attributes["city"], "Oslo");
    assert_eq!(p.attributes["email"], "One@Example.com");
    assert!(!p.attributes.contains_key("score"));
    assert_eq!(t.sim().people_count(), 1);

    // _update: true never creates.
    assert_eq!(
        status_of(put("ghost", json!({"_update": true, "a": 1}))).await?,
        200
    );
    assert!(t.sim().person("ghost").is_none());
    // ... but updates an existing person.
    assert_eq!(
        status_of(put("u1", json!({"_update": true, "a": 1}))).await?,
        200
    );
    assert_eq!(
        t.sim().person("u1").map(|p| p.attributes["a"].clone()),
        Some(json!(1))
    );

    // Email in the path (percent-encoded) finds the same person case-insensitively.
    assert_eq!(
        status_of(put("one%40example.com", json!({"via":"email"}))).await?,
        200
    );
    assert_eq!(
        t.sim().person("u1").map(|p| p.attributes["via"].clone()),
        Some(json!("email"))
    );
    assert_eq!(t.sim().people_count(), 1);

    // A new email creates an id-less person.
    assert_eq!(
        status_of(put("new%40example.com", json!({"x":1}))).await?,
        200
    );
    let by_email = t.sim().person_by_email("new@example.com");
    assert!(
        by_email.as_ref().is_some_and(|p| p.id.is_none()),
        "{by_email:?}"
    );

    // cio_ identifier updates; an unknown one is dropped.
    let cio = t.sim().person("u1").map(|p| p.cio_id).unwrap_or_default();
    assert_eq!(
        status_of(put(&format!("cio_{cio}"), json!({"via":"cio"}))).await?,
        200
    );
    assert_eq!(
        t.sim().person("u1").map(|p| p.attributes["via"].clone()),
        Some(json!("cio"))
    );
    assert_eq!(status_of(put("cio_ffffffff", json!({"x":1}))).await?, 200);
    assert_eq!(t.sim().people_count(), 2);

    // A path segment with an encoded slash and space is one identifier.
    assert_eq!(status_of(put("a%20b%2Fc", json!({}))).await?, 200);
    assert!(t.sim().person("a b/c").is_some());

    // Empty body is accepted; invalid JSON is not.
    assert_eq!(
        status_of(t.track(Method::PUT, "/api/v1/customers/u2")).await?,
        200
    );
    assert!(t.sim().person("u2").is_some());
    let (status, body) = send(
        t.track(Method::PUT, "/api/v1/customers/u3")
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await?;
    assert_eq!(status, 400);
    assert!(body["meta"]["errors"][0].is_string(), "{body}");
    assert!(t.sim().person("u3").is_none());
    Ok(())
}

#[tokio::test]
async fn identify_enforces_customerio_limits() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let put = |id: &str, body: Value| {
        t.track(Method::PUT, &format!("/api/v1/customers/{id}"))
            .json(&body)
    };

    let long_id = "i".repeat(151);
    let (status, body) = send(put(&long_id, json!({}))).await?;
    assert_eq!(status, 400);
    assert!(
        body["meta"]["errors"]
            .as_array()
            .is_some_and(|e| e.len() == 1),
        "{body}"
    );
    assert_eq!(status_of(put(&"i".repeat(150), json!({}))).await?, 200);

    assert_eq!(
        status_of(put("u1", json!({ "n".repeat(151): 1 }))).await?,
        400
    );
    assert_eq!(
        status_of(put("u1", json!({ "n".repeat(150): 1 }))).await?,
        200
    );
    assert_eq!(
        status_of(put("u1", json!({ "v": "x".repeat(1001) }))).await?,
        400
    );
    assert_eq!(
        status_of(put("u1", json!({ "v": "x".repeat(1000) }))).await?,
        200
    );

    let many = |n: usize| -> Value {
        Value::Object(
            (0..n)
                .map(|i| (format!("a{i}"), json!(i)))
                .collect::<Map<_, _>>(),
        )
    };
    assert_eq!(status_of(put("u2", many(301))).await?, 400);
    assert!(
        t.sim().person("u2").is_none(),
        "a rejected identify must not create"
    );
    assert_eq!(status_of(put("u2", many(300))).await?, 200);
    assert_eq!(t.sim().person("u2").map(|p| p.attributes.len()), Some(300));

    // Several violations are all reported.
    let (status, body) = send(put(&long_id, json!({ "v": "x".repeat(1001) }))).await?;
    assert_eq!(status, 400);
    assert_eq!(
        body["meta"]["errors"].as_array().map(Vec::len),
        Some(2),
        "{body}"
    );
    Ok(())
}

#[tokio::test]
async fn manual_segment_membership_via_track() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let seg = t.sim().create_manual_segment("Test list", "");
    let add = |query: &str, ids: Value| {
        t.track(
            Method::POST,
            &format!("/api/v1/segments/{seg}/add_customers{query}"),
        )
        .json(&json!({ "ids": ids }))
    };

    let (status, body) = send(add("", json!(["u00001", "u00002", "does-not-exist"]))).await?;
    assert_eq!((status, body), (200, json!({})));
    assert_eq!(
        t.sim().segment_members(seg),
        Some(vec!["u00001".to_owned(), "u00002".to_owned()])
    );

    let email = t
        .sim()
        .person("u00003")
        .and_then(|p| p.email)
        .unwrap_or_default();
    assert_eq!(
        status_of(add("?id_type=email", json!([email.to_uppercase()]))).await?,
        200
    );
    let cio = t
        .sim()
        .person("u00004")
        .map(|p| p.cio_id)
        .unwrap_or_default();
    assert_eq!(status_of(add("?id_type=cio_id", json!([cio]))).await?, 200);
    assert_eq!(t.sim().segment_members(seg).map(|m| m.len()), Some(4));

    // Adding again is idempotent.
    assert_eq!(status_of(add("", json!(["u00001"]))).await?, 200);
    assert_eq!(t.sim().segment_members(seg).map(|m| m.len()), Some(4));

    let remove = t
        .track(
            Method::POST,
            &format!("/api/v1/segments/{seg}/remove_customers"),
        )
        .json(&json!({"ids": ["u00001", "u00003"]}));
    assert_eq!(status_of(remove).await?, 200);
    assert_eq!(
        t.sim().segment_members(seg),
        Some(vec!["u00002".to_owned(), "u00004".to_owned()])
    );

    // Removing a person removes their membership.
    assert!(t.sim().remove_person("u00002"));
    assert_eq!(
        t.sim().segment_members(seg),
        Some(vec!["u00004".to_owned()])
    );
    Ok(())
}

#[tokio::test]
async fn manual_segment_membership_rejects_invalid_input() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let seg = t.sim().create_manual_segment("Test list", "");
    let dynamic = t
        .sim()
        .segments()
        .into_iter()
        .find(|s| s.kind == cio_sim::SegmentKind::Dynamic)
        .ok_or_else(|| anyhow::anyhow!("demo has dynamic segments"))?;
    let post = |seg: &str, query: &str, body: Value| {
        t.track(
            Method::POST,
            &format!("/api/v1/segments/{seg}/add_customers{query}"),
        )
        .json(&body)
    };
    let ids = json!({"ids": ["u00001"]});

    // Data-driven segment: rejected, membership unchanged.
    let (status, body) = send(post(&dynamic.id.to_string(), "", ids.clone())).await?;
    assert_eq!(status, 400);
    assert!(
        body["meta"]["errors"][0]
            .as_str()
            .is_some_and(|e| e.contains("data-driven")),
        "{body}"
    );
    let after = t.sim().segments().into_iter().find(|s| s.id == dynamic.id);
    assert_eq!(after.map(|s| s.member_count), Some(dynamic.member_count));

    assert_eq!(status_of(post("999", "", ids.clone())).await?, 400);
    assert_eq!(status_of(post("abc", "", ids.clone())).await?, 400);
    assert_eq!(
        status_of(post(&seg.to_string(), "?id_type=phone", ids.clone())).await?,
        400
    );
    assert_eq!(
        status_of(post(&seg.to_string(), "", json!({"ids": []}))).await?,
        400
    );
    assert_eq!(status_of(post(&seg.to_string(), "", json!({}))).await?, 400);
    assert_eq!(
        status_of(post(&seg.to_string(), "", json!({"ids": "u1"}))).await?,
        400
    );
    let too_many: Vec<String> = (0..1001).map(|i| format!("u{i:05}")).collect();
    assert_eq!(
        status_of(post(&seg.to_string(), "", json!({ "ids": too_many }))).await?,
        400
    );
    assert_eq!(t.sim().segment_members(seg), Some(vec![]));
    let max: Vec<String> = (1..=1000).map(|i| format!("u{i:05}")).collect();
    assert_eq!(
        status_of(post(&seg.to_string(), "", json!({ "ids": max }))).await?,
        200
    );
    assert_eq!(t.sim().segment_members(seg).map(|m| m.len()), Some(1000));
    Ok(())
}

#[tokio::test]
async fn dynamic_segments_follow_identify() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let high = t
        .sim()
        .segments()
        .into_iter()
        .find(|s| s.name == "High Engagement")
        .ok_or_else(|| anyhow::anyhow!("High Engagement missing"))?;
    let already_member = t
        .sim()
        .segment_members(high.id)
        .map(|m| m.contains(&"u00002".to_owned()));
    let target = if already_member == Some(true) { 10 } else { 95 };
    let expected = if target >= 80 {
        high.member_count + 1
    } else {
        high.member_count - 1
    };
    let put = t
        .track(Method::PUT, "/api/v1/customers/u00002")
        .json(&json!({ "engagement_score": target }));
    assert_eq!(status_of(put).await?, 200);
    let (status, body) = send(t.app(
        Method::GET,
        &format!("/v1/segments/{}/customer_count", high.id),
    ))
    .await?;
    assert_eq!(status, 200);
    assert_eq!(body["count"].as_u64(), Some(expected));
    Ok(())
}

#[tokio::test]
async fn track_rate_limit_is_separate_from_app() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    t.sim().set_rate_limit(SimApi::Track, 2);
    let path = "/api/v1/accounts/region";
    assert_eq!(status_of(t.track(Method::GET, path)).await?, 200);
    assert_eq!(status_of(t.track(Method::GET, path)).await?, 200);
    let response = t.track(Method::GET, path).send().await?;
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().get("retry-after").is_some());
    // App API unaffected.
    assert_eq!(status_of(t.app(Method::GET, "/v1/segments")).await?, 200);
    Ok(())
}
