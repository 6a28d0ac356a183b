//! Customer exports: create, complete on the simulator's clock, signed download without
//! credentials, expiry, validation, injected failures.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{TestSim, empty_unlimited, send, spawn, status_of};
use cio_sim::ExportStatus;

async fn create(t: &TestSim, body: Value) -> anyhow::Result<(u16, Value)> {
    send(t.app(Method::POST, "/v1/exports/customers").json(&body)).await
}

fn people(t: &TestSim) {
    let sim = t.sim();
    for (id, attrs) in [
        (
            "a1",
            json!({"email": "a1@example.com", "plan": "pro", "city": "Paris, FR", "score": 90}),
        ),
        (
            "a2",
            json!({"email": "a2@example.com", "plan": "pro", "nick": "the \"ace\""}),
        ),
        ("a3", json!({"plan": "free"})),
        (
            "a4",
            json!({"email": "a4@example.com", "plan": "pro", "tags": ["x", "y"]}),
        ),
    ] {
        sim.upsert_person(id, attrs.as_object().cloned().unwrap_or_default());
    }
}

#[tokio::test]
async fn an_export_completes_on_the_clock_and_downloads_without_credentials() -> anyhow::Result<()>
{
    let t = spawn(empty_unlimited()).await?;
    people(&t);
    let (status, created) = create(
        &t,
        json!({
            "filters": {"attribute": {"field": "plan", "operator": "eq", "value": "pro"}},
            "attributes": ["city", "nick", "score", "tags", "email", "city"]
        }),
    )
    .await?;
    assert_eq!(status, 200, "{created}");
    let export = &created["export"];
    let id = export["id"].as_i64().unwrap_or(0);
    assert_eq!(id, 1);
    assert_eq!(export["type"], "customers");
    assert_eq!(
        (&export["done"], &export["failed"], &export["total"]),
        (&json!(false), &json!(false), &json!(0))
    );
    assert_eq!(export["status"], "pending");

    // Not downloadable yet.
    let (status, body) = send(t.app(Method::GET, &format!("/v1/exports/{id}/download"))).await?;
    assert_eq!(status, 400, "{body}");

    t.sim().advance(Duration::from_secs(3));
    let (status, got) = send(t.app(Method::GET, &format!("/v1/exports/{id}"))).await?;
    assert_eq!(status, 200);
    assert_eq!(got["export"]["done"], true, "{got}");
    assert_eq!(got["export"]["status"], "done");
    assert_eq!(got["export"]["total"], 3);

    let (status, link) = send(t.app(Method::GET, &format!("/v1/exports/{id}/download"))).await?;
    assert_eq!(status, 200, "{link}");
    let url = link["url"].as_str().unwrap_or_default().to_owned();
    assert!(
        url.starts_with(&format!("{}/_files/exports/{id}?", t.base)),
        "{url}"
    );
    // No credentials at all.
    let response = reqwest::get(&url).await?;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/csv")
    );
    let csv = response.text().await?;
    let cio = |id: &str| t.sim().person(id).map(|p| p.cio_id).unwrap_or_default();
    let expected = format!(
        "id,email,cio_id,city,nick,score,tags\n\
         a1,a1@example.com,{},\"Paris, FR\",,90,\n\
         a2,a2@example.com,{},,\"the \"\"ace\"\"\",,\n\
         a4,a4@example.com,{},,,,\"[\"\"x\"\",\"\"y\"\"]\"\n",
        cio("a1"),
        cio("a2"),
        cio("a4")
    );
    assert_eq!(csv, expected);
    assert_eq!(t.sim().export_csv(id).as_deref(), Some(expected.as_str()));
    let (_, list) = send(t.app(Method::GET, "/v1/exports")).await?;
    assert_eq!(list["exports"][0]["downloads"], 1);
    assert_eq!(t.sim().exports()[0].status, ExportStatus::Done);

    // An Authorization header is refused (one auth mechanism only), a changed signature or id
    // is refused, and the link dies after 15 minutes.
    let with_auth = t
        .client
        .get(&url)
        .header("Authorization", t.sim().config().app_authorization());
    assert_eq!(status_of(with_auth).await?, 400);
    let tampered = url.replace("signature=", "signature=0");
    assert_eq!(status_of(t.client.get(&tampered)).await?, 403);
    let other_id = url.replace("/exports/1?", "/exports/2?");
    assert_eq!(status_of(t.client.get(&other_id)).await?, 403);
    t.sim().advance(Duration::from_secs(14 * 60));
    assert_eq!(status_of(t.client.get(&url)).await?, 200);
    t.sim().advance(Duration::from_secs(2 * 60));
    let expired = t.client.get(&url).send().await?;
    assert_eq!(expired.status(), 403);
    assert!(expired.text().await?.contains("expired"));
    // A fresh link works again.
    let (_, link) = send(t.app(Method::GET, &format!("/v1/exports/{id}/download"))).await?;
    let fresh = link["url"].as_str().unwrap_or_default();
    assert_eq!(status_of(t.client.get(fresh)).await?, 200);
    Ok(())
}

#[tokio::test]
async fn the_file_is_the_audience_when_it_completes() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t);
    let segment = t.sim().create_manual_segment("VIP", "");
    t.sim().add_to_manual_segment(segment, &["a1", "a3"])?;
    let (_, created) = create(
        &t,
        json!({"filters": {"or": [{"segment": {"id": segment}}, {"not": {"attribute": {"field": "email", "operator": "exists"}}}]}}),
    )
    .await?;
    let id = created["export"]["id"].as_i64().unwrap_or(0);
    // Joins before completion are in the file.
    t.sim().add_to_manual_segment(segment, &["a4"])?;
    t.sim().advance(Duration::from_secs(2));
    let csv = t.sim().export_csv(id).unwrap_or_default();
    let ids: Vec<&str> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').next())
        .collect();
    assert_eq!(ids, vec!["a1", "a3", "a4"]);
    assert!(csv.starts_with("id,email,cio_id\n"), "{csv}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_are_400_and_unknown_exports_404() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    for (body, pointer) in [
        (json!({}), "/filters"),
        (json!({"filters": {}}), "/filters"),
        (json!({"filters": {"and": []}}), "/filters/and"),
        (
            json!({"filters": {"attribute": {"field": "a", "operator": "gt", "value": "1"}}}),
            "/filters/attribute/operator",
        ),
        (json!({"filters": {"segment": {"id": 99}}}), "/filters"),
        (
            json!({"filters": {"segment": {"id": 1}}, "attributes": "plan"}),
            "/attributes",
        ),
        (
            json!({"filters": {"attribute": {"field": "a", "operator": "exists"}}, "attributes": ["ok", ""]}),
            "/attributes/1",
        ),
    ] {
        let (status, answer) = create(&t, body.clone()).await?;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_eq!(
            answer["errors"][0]["source"]["pointer"], pointer,
            "{body}: {answer}"
        );
    }
    let status = status_of(
        t.app(Method::POST, "/v1/exports/customers")
            .body("not json"),
    )
    .await?;
    assert_eq!(status, 400);
    assert!(t.sim().exports().is_empty(), "nothing was created");
    for path in ["/v1/exports/7", "/v1/exports/x", "/v1/exports/7/download"] {
        assert_eq!(status_of(t.app(Method::GET, path)).await?, 404, "{path}");
    }
    // The App key is required on the App routes.
    let status = status_of(t.control(Method::GET, "/v1/exports")).await?;
    assert_eq!(status, 401);
    Ok(())
}

#[tokio::test]
async fn injected_failures_and_delay_over_control() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t);
    let (status, state) = send(
        t.control(Method::POST, "/_sim/exports")
            .json(&json!({"fail_next": 1, "delay_ms": 60_000})),
    )
    .await?;
    assert_eq!(status, 200, "{state}");
    assert_eq!(
        (state["fail_next"].as_u64(), state["delay_ms"].as_u64()),
        (Some(1), Some(60_000))
    );
    let filters = json!({"filters": {"attribute": {"field": "plan", "operator": "exists"}}});
    let (_, first) = create(&t, filters.clone()).await?;
    let (_, second) = create(&t, filters).await?;
    t.sim().advance(Duration::from_secs(59));
    let (_, list) = send(t.app(Method::GET, "/v1/exports")).await?;
    assert_eq!(list["exports"][0]["status"], "pending");
    t.sim().advance(Duration::from_secs(1));
    let first = first["export"]["id"].as_i64().unwrap_or(0);
    let second = second["export"]["id"].as_i64().unwrap_or(0);
    let (_, failed) = send(t.app(Method::GET, &format!("/v1/exports/{first}"))).await?;
    assert_eq!(
        (
            &failed["export"]["failed"],
            &failed["export"]["done"],
            &failed["export"]["status"]
        ),
        (&json!(true), &json!(false), &json!("failed"))
    );
    let (status, _) = send(t.app(Method::GET, &format!("/v1/exports/{first}/download"))).await?;
    assert_eq!(status, 400);
    let (_, done) = send(t.app(Method::GET, &format!("/v1/exports/{second}"))).await?;
    assert_eq!(done["export"]["total"], 4);
    let (_, state) = send(t.control(Method::GET, "/_sim/exports")).await?;
    assert_eq!(state["fail_next"], 0);
    assert_eq!(state["exports"].as_array().map(Vec::len), Some(2));
    Ok(())
}
