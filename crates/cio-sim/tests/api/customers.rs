//! App API customer reads, answered from the state the Track API writes.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{empty_unlimited, send, spawn, status_of};
use cio_sim::Predicate;

#[tokio::test]
async fn customer_segments_follow_dynamic_and_manual_membership() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let high =
        t.sim()
            .add_dynamic_segment("High", "score >= 80", Predicate::Gte("score".into(), 80.0));
    let vip = t.sim().create_manual_segment("VIP", "hand-picked");
    let _other = t.sim().create_manual_segment("Other", "");
    let put = |body: Value| t.track(Method::PUT, "/api/v1/customers/u1").json(&body);
    assert_eq!(
        status_of(put(json!({"score": 90, "email": "u1@e.com"}))).await?,
        200
    );
    let add = t
        .track(
            Method::POST,
            &format!("/api/v1/segments/{vip}/add_customers"),
        )
        .json(&json!({"ids": ["u1"]}));
    assert_eq!(status_of(add).await?, 200);

    let segment_ids = |body: &Value| -> Vec<i64> {
        body["segments"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_i64())
            .collect()
    };
    let (status, body) = send(t.app(Method::GET, "/v1/customers/u1/segments")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(segment_ids(&body), vec![high, vip]);
    assert_eq!(body["segments"][0]["name"], "High");
    assert_eq!(body["segments"][0]["description"], "score >= 80");
    assert_eq!(body["segments"][1]["type"], "manual");

    // Data changes move dynamic membership.
    assert_eq!(status_of(put(json!({"score": 50}))).await?, 200);
    let (_, body) = send(t.app(
        Method::GET,
        "/v1/customers/U1%40e.com/segments?id_type=email",
    ))
    .await?;
    assert_eq!(segment_ids(&body), vec![vip]);
    let cio = t.sim().person("u1").map(|p| p.cio_id).unwrap_or_default();
    let (_, body) = send(t.app(
        Method::GET,
        &format!("/v1/customers/{cio}/segments?id_type=cio_id"),
    ))
    .await?;
    assert_eq!(segment_ids(&body), vec![vip]);

    // Someone in no segment: empty list; unknown: 404; bad id_type: 400.
    t.sim().upsert_person("u2", Default::default());
    let (status, body) = send(t.app(Method::GET, "/v1/customers/u2/segments")).await?;
    assert_eq!((status, body), (200, json!({"segments": []})));
    let (status, body) = send(t.app(Method::GET, "/v1/customers/nobody/segments")).await?;
    assert_eq!(status, 404);
    assert_eq!(body["errors"][0]["status"], "404");
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/u1/segments?id_type=phone")).await?,
        400
    );
    // App auth applies.
    assert_eq!(
        status_of(t.control(Method::GET, "/v1/customers/u1/segments")).await?,
        401
    );
    Ok(())
}

#[tokio::test]
async fn customers_attributes_returns_the_found_ones() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let put = |id: &str, body: Value| {
        t.track(Method::PUT, &format!("/api/v1/customers/{id}"))
            .json(&body)
    };
    assert_eq!(
        status_of(put(
            "a",
            json!({"email": "a@e.com", "score": 7, "pro": true})
        ))
        .await?,
        200
    );
    assert_eq!(status_of(put("b", json!({}))).await?, 200);
    assert_eq!(status_of(put("c", json!({"city": "Oslo"}))).await?, 200);
    let post = |query: &str, body: Value| {
        t.app(Method::POST, &format!("/v1/customers/attributes{query}"))
            .json(&body)
    };

    let (status, body) = send(post("", json!({"ids": ["c", "missing", "a", "c"]}))).await?;
    assert_eq!(status, 200, "{body}");
    let customers = body["customers"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        customers.len(),
        2,
        "unknown ids omitted, repeats once: {body}"
    );
    let c = &customers[0]["customer"];
    assert_eq!(c["id"], "c");
    assert_eq!(c["attributes"]["city"], "Oslo");
    let a = &customers[1]["customer"];
    assert_eq!(
        a["identifiers"],
        json!({"id": "a", "email": "a@e.com", "cio_id": a["identifiers"]["cio_id"]})
    );
    assert_eq!(
        a["attributes"]["score"], "7",
        "attribute values are strings"
    );
    assert_eq!(a["attributes"]["pro"], "true");
    assert_eq!(a["attributes"]["id"], "a");
    assert!(a["attributes"]["cio_id"].is_string());
    assert!(a["timestamps"]["score"].is_i64());
    assert_eq!(a["unsubscribed"], false);
    assert_eq!(a["devices"], json!([]));
    // Same shape as the single lookup.
    let (_, single) = send(t.app(Method::GET, "/v1/customers/a/attributes")).await?;
    assert_eq!(single["customer"], *a);

    let (_, body) = send(post("?id_type=email", json!({"ids": ["A@E.com"]}))).await?;
    assert_eq!(body["customers"][0]["customer"]["id"], "a");
    let (status, body) = send(post("", json!({"ids": ["nobody"]}))).await?;
    assert_eq!((status, body), (200, json!({"customers": []})));

    let hundred: Vec<String> = (0..100).map(|i| format!("id{i}")).collect();
    assert_eq!(status_of(post("", json!({ "ids": hundred }))).await?, 200);
    let too_many: Vec<String> = (0..101).map(|i| format!("id{i}")).collect();
    let (status, body) = send(post("", json!({ "ids": too_many }))).await?;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["status"], "400", "{body}");
    for bad in [
        json!({"ids": []}),
        json!({}),
        json!({"ids": "a"}),
        json!({"ids": [1, 2]}),
    ] {
        assert_eq!(status_of(post("", bad.clone())).await?, 400, "{bad}");
    }
    assert_eq!(
        status_of(post("?id_type=phone", json!({"ids": ["a"]}))).await?,
        400
    );
    let not_json = t
        .app(Method::POST, "/v1/customers/attributes")
        .header("content-type", "application/json")
        .body("{");
    assert_eq!(status_of(not_json).await?, 400);
    Ok(())
}

#[tokio::test]
async fn customers_by_email() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let put = t
        .track(Method::PUT, "/api/v1/customers/u1")
        .json(&json!({"email": "Reader@Example.com"}));
    assert_eq!(status_of(put).await?, 200);
    let by_email = t
        .track(Method::PUT, "/api/v1/customers/only%40example.com")
        .json(&json!({}));
    assert_eq!(status_of(by_email).await?, 200);
    let cio = t.sim().person("u1").map(|p| p.cio_id).unwrap_or_default();

    let (status, body) =
        send(t.app(Method::GET, "/v1/customers?email=reader%40example.com")).await?;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"results": [{"email": "Reader@Example.com", "id": "u1", "cio_id": cio}]})
    );
    let (_, body) = send(t.app(Method::GET, "/v1/customers?email=only%40example.com")).await?;
    assert_eq!(body["results"][0]["id"], Value::Null);
    assert!(body["results"][0]["cio_id"].is_string());
    let (status, body) = send(t.app(Method::GET, "/v1/customers?email=none%40example.com")).await?;
    assert_eq!((status, body), (200, json!({"results": []})));

    assert_eq!(status_of(t.app(Method::GET, "/v1/customers")).await?, 400);
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers?email=")).await?,
        400
    );
    Ok(())
}
