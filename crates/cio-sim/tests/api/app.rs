//! App API: auth, segments, membership pagination, customers.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{demo_unlimited, empty_unlimited, send, spawn, status_of};
use cio_sim::{Predicate, SegmentKind};

#[tokio::test]
async fn app_requires_bearer_auth() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let (status, body) = send(t.control(Method::GET, "/v1/segments")).await?;
    assert_eq!(status, 401);
    assert_eq!(body["errors"][0]["status"], "401", "{body}");
    assert!(body["errors"][0]["detail"].is_string());

    let wrong = t
        .control(Method::GET, "/v1/segments")
        .header("Authorization", "Bearer sim-app-key-x");
    assert_eq!(status_of(wrong).await?, 401);
    let basic = t
        .control(Method::GET, "/v1/segments")
        .basic_auth("sim-site", Some("sim-track-key"));
    assert_eq!(status_of(basic).await?, 401);
    let lower_scheme = t
        .control(Method::GET, "/v1/segments")
        .header("Authorization", "bearer sim-app-key");
    assert_eq!(status_of(lower_scheme).await?, 200);

    let (status, body) = send(t.app(Method::GET, "/v1/nothing-here")).await?;
    assert_eq!(status, 404);
    assert_eq!(body["errors"][0]["status"], "404", "{body}");
    assert_eq!(status_of(t.control(Method::GET, "/elsewhere")).await?, 404);
    Ok(())
}

#[tokio::test]
async fn lists_and_gets_segments() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = send(t.app(Method::GET, "/v1/segments")).await?;
    assert_eq!(status, 200);
    let segments = body["segments"].as_array().cloned().unwrap_or_default();
    assert_eq!(segments.len(), t.sim().segments().len());
    assert!(segments.len() >= 9);
    let ids: Vec<i64> = segments.iter().filter_map(|s| s["id"].as_i64()).collect();
    assert_eq!(ids, (1..=segments.len() as i64).collect::<Vec<_>>());
    for s in &segments {
        for field in [
            "deduplicate_id",
            "name",
            "description",
            "created_at",
            "updated_at",
        ] {
            assert!(!s[field].is_null(), "{field} missing in {s}");
        }
        assert_eq!(s["state"], "finished");
        assert!(s["progress"].is_null());
        assert!(s.as_object().is_some_and(|o| o.contains_key("tags")));
        assert!(s["type"] == "dynamic" || s["type"] == "manual");
    }
    let names: BTreeSet<&str> = segments.iter().filter_map(|s| s["name"].as_str()).collect();
    for name in [
        "Growth Investors",
        "Crypto Enthusiasts",
        "High Engagement",
        "VIP Beta Testers",
    ] {
        assert!(names.contains(name), "{name} missing");
    }
    let manual = segments.iter().filter(|s| s["type"] == "manual").count();
    assert!(manual >= 1);
    let empty = t
        .sim()
        .segments()
        .into_iter()
        .filter(|s| s.member_count == 0)
        .count();
    assert!(empty >= 1, "one demo segment is empty");

    let (status, body) = send(t.app(Method::GET, "/v1/segments/1")).await?;
    assert_eq!(status, 200);
    assert_eq!(body["segment"], segments[0]);

    for missing in [
        "/v1/segments/999",
        "/v1/segments/abc",
        "/v1/segments/1.5",
        "/v1/segments/99999999999",
    ] {
        let (status, body) = send(t.app(Method::GET, missing)).await?;
        assert_eq!(status, 404, "{missing}");
        assert_eq!(body["errors"][0]["status"], "404");
    }
    Ok(())
}

#[tokio::test]
async fn customer_count_matches_state() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let mut counts = BTreeSet::new();
    for s in t.sim().segments() {
        let (status, body) = send(t.app(
            Method::GET,
            &format!("/v1/segments/{}/customer_count", s.id),
        ))
        .await?;
        assert_eq!(status, 200);
        assert_eq!(body, json!({ "count": s.member_count }));
        assert_eq!(
            t.sim().segment_members(s.id).map(|m| m.len() as u64),
            Some(s.member_count)
        );
        assert!(s.member_count < 5000);
        counts.insert(s.member_count);
    }
    assert!(
        counts.len() >= 9,
        "demo counts should be distinct: {counts:?}"
    );
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/segments/999/customer_count")).await?,
        404
    );
    Ok(())
}

/// Pages through a segment; returns the ids in order and the number of pages.
async fn page_all(
    t: &crate::helpers::TestSim,
    id: i64,
    limit: usize,
) -> anyhow::Result<(Vec<String>, usize)> {
    let mut ids = Vec::new();
    let mut start = String::new();
    let mut pages = 0;
    loop {
        let path = format!("/v1/segments/{id}/membership?limit={limit}&start={start}");
        let (status, body) = send(t.app(Method::GET, &path)).await?;
        anyhow::ensure!(status == 200, "{status} {body}");
        pages += 1;
        let page_ids: Vec<String> = body["ids"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let identifiers = body["identifiers"].as_array().cloned().unwrap_or_default();
        anyhow::ensure!(identifiers.len() == page_ids.len());
        for (ident, id) in identifiers.iter().zip(&page_ids) {
            anyhow::ensure!(ident["id"] == json!(id), "{ident}");
            anyhow::ensure!(ident["cio_id"].is_string() && ident.get("email").is_some());
        }
        anyhow::ensure!(page_ids.len() <= limit);
        ids.extend(page_ids);
        match body["next"].as_str() {
            Some("") | None => break,
            Some(next) => start = next.to_owned(),
        }
        anyhow::ensure!(pages < 10_000, "pagination does not end");
    }
    Ok((ids, pages))
}

#[tokio::test]
async fn membership_pages_cover_every_member_once() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    for segment in t.sim().segments() {
        let (ids, pages) = page_all(&t, segment.id, 97).await?;
        let unique: BTreeSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len(), "duplicates in {}", segment.name);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(
            Some(sorted),
            t.sim().segment_members(segment.id),
            "{}",
            segment.name
        );
        let expected_pages = (segment.member_count as usize).div_ceil(97).max(1);
        assert_eq!(pages, expected_pages, "{}", segment.name);
    }
    // Default limit is 1000.
    let big = t
        .sim()
        .segments()
        .into_iter()
        .find(|s| s.member_count > 1000)
        .ok_or_else(|| anyhow::anyhow!("a segment over 1000 members"))?;
    let (status, body) =
        send(t.app(Method::GET, &format!("/v1/segments/{}/membership", big.id))).await?;
    assert_eq!(status, 200);
    assert_eq!(body["ids"].as_array().map(Vec::len), Some(1000));
    assert!(body["next"].as_str().is_some_and(|n| !n.is_empty()));
    // 30000 fits everyone in one page, ending with an empty next.
    let (_, body) = send(t.app(
        Method::GET,
        &format!("/v1/segments/{}/membership?limit=30000", big.id),
    ))
    .await?;
    assert_eq!(
        body["ids"].as_array().map(|a| a.len() as u64),
        Some(big.member_count)
    );
    assert_eq!(body["next"], "");
    Ok(())
}

#[tokio::test]
async fn membership_validates_limit_and_cursor() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    for bad in [
        "limit=0",
        "limit=30001",
        "limit=-1",
        "limit=abc",
        "start=garbled!!",
        "start=bTE6eA",
    ] {
        let (status, body) =
            send(t.app(Method::GET, &format!("/v1/segments/1/membership?{bad}"))).await?;
        assert_eq!(status, 400, "{bad}");
        assert_eq!(body["errors"][0]["status"], "400", "{bad}: {body}");
    }
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/segments/999/membership")).await?,
        404
    );
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/segments/1/membership?limit=1")).await?,
        200
    );
    Ok(())
}

#[tokio::test]
async fn membership_cursor_survives_changes() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    for i in 1..=5 {
        t.sim()
            .upsert_person(&format!("p{i}"), serde_json::Map::new());
    }
    let seg = t
        .sim()
        .add_dynamic_segment("all", "", Predicate::Exists("cio_id".into()));
    let (_, first) = send(t.app(
        Method::GET,
        &format!("/v1/segments/{seg}/membership?limit=2"),
    ))
    .await?;
    assert_eq!(first["ids"], json!(["p1", "p2"]));
    // A member already seen leaves; the next page still starts after p2.
    assert!(t.sim().remove_person("p1"));
    let next = first["next"].as_str().unwrap_or_default();
    let (_, second) = send(t.app(
        Method::GET,
        &format!("/v1/segments/{seg}/membership?limit=2&start={next}"),
    ))
    .await?;
    assert_eq!(second["ids"], json!(["p3", "p4"]));
    Ok(())
}

#[tokio::test]
async fn manual_segment_lifecycle() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let before = t.sim().segments().len();

    let (status, body) = send(
        t.app(Method::POST, "/v1/segments")
            .json(&json!({"segment": {"description": "x"}})),
    )
    .await?;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["status"], "400");
    assert_eq!(
        status_of(
            t.app(Method::POST, "/v1/segments")
                .json(&json!({"name": "flat"}))
        )
        .await?,
        400
    );
    assert_eq!(
        status_of(
            t.app(Method::POST, "/v1/segments")
                .json(&json!({"segment": {"name": "  "}}))
        )
        .await?,
        400
    );
    assert_eq!(
        status_of(t.app(Method::POST, "/v1/segments").body("nope")).await?,
        400
    );
    assert_eq!(t.sim().segments().len(), before);

    // Criteria are not a thing in the real API: still a manual segment.
    let create = json!({"segment": {"name": "Beta", "description": "beta list", "criteria": {"gte": ["engagement_score", 1]}}});
    let (status, body) = send(t.app(Method::POST, "/v1/segments").json(&create)).await?;
    assert_eq!(status, 200);
    let segment = &body["segment"];
    assert_eq!(segment["type"], "manual");
    assert_eq!(segment["name"], "Beta");
    assert_eq!(segment["description"], "beta list");
    assert_eq!(segment["state"], "finished");
    let id = segment["id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("id"))?;
    assert!(id > before as i64);
    let count = |t: &crate::helpers::TestSim| {
        let req = t.app(Method::GET, &format!("/v1/segments/{id}/customer_count"));
        async move { send(req).await.map(|(s, b)| (s, b["count"].clone())) }
    };
    assert_eq!(count(&t).await?, (200, json!(0)));

    let add = t
        .track(
            Method::POST,
            &format!("/api/v1/segments/{id}/add_customers"),
        )
        .json(&json!({"ids": ["u00010", "u00011", "u00012"]}));
    assert_eq!(status_of(add).await?, 200);
    assert_eq!(count(&t).await?, (200, json!(3)));
    let (_, page) = send(t.app(Method::GET, &format!("/v1/segments/{id}/membership"))).await?;
    assert_eq!(page["ids"], json!(["u00010", "u00011", "u00012"]));
    assert_eq!(page["next"], "");

    let remove = t
        .track(
            Method::POST,
            &format!("/api/v1/segments/{id}/remove_customers"),
        )
        .json(&json!({"ids": ["u00011"]}));
    assert_eq!(status_of(remove).await?, 200);
    assert_eq!(count(&t).await?, (200, json!(2)));

    let (status, body) = send(t.app(Method::DELETE, &format!("/v1/segments/{id}"))).await?;
    assert_eq!((status, body), (204, Value::Null));
    assert_eq!(
        status_of(t.app(Method::GET, &format!("/v1/segments/{id}"))).await?,
        404
    );
    assert_eq!(count(&t).await?.0, 404);
    assert_eq!(
        status_of(t.app(Method::DELETE, &format!("/v1/segments/{id}"))).await?,
        404
    );
    assert_eq!(t.sim().segments().len(), before);

    // Data-driven segments cannot be deleted through the API.
    let dynamic = t
        .sim()
        .segments()
        .into_iter()
        .find(|s| s.kind == SegmentKind::Dynamic)
        .ok_or_else(|| anyhow::anyhow!("dynamic"))?;
    assert_eq!(
        status_of(t.app(Method::DELETE, &format!("/v1/segments/{}", dynamic.id))).await?,
        400
    );
    assert!(t.sim().segments().iter().any(|s| s.id == dynamic.id));
    Ok(())
}

#[tokio::test]
async fn customer_attributes_lookup() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let mut attrs = serde_json::Map::new();
    attrs.insert("email".into(), json!("a@example.com"));
    attrs.insert("score".into(), json!(42));
    attrs.insert("tags".into(), json!(["x"]));
    t.sim().upsert_person("u1", attrs);

    let (status, body) = send(t.app(Method::GET, "/v1/customers/u1/attributes")).await?;
    assert_eq!(status, 200);
    let c = &body["customer"];
    assert_eq!(c["id"], "u1");
    assert_eq!(c["identifiers"]["email"], "a@example.com");
    assert_eq!(
        c["attributes"]["score"], "42",
        "attribute values are strings"
    );
    assert_eq!(c["attributes"]["id"], "u1");
    assert!(c["timestamps"]["score"].is_i64());
    assert_eq!(c["unsubscribed"], false);

    let (status, _) = send(t.app(
        Method::GET,
        "/v1/customers/a%40example.com/attributes?id_type=email",
    ))
    .await?;
    assert_eq!(status, 200);
    let (status, body) = send(t.app(Method::GET, "/v1/customers/nobody/attributes")).await?;
    assert_eq!(status, 404);
    assert_eq!(body["errors"][0]["status"], "404");
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/u1/attributes?id_type=phone")).await?,
        400
    );
    Ok(())
}

#[tokio::test]
async fn empty_workspace_has_nothing() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let (status, body) = send(t.app(Method::GET, "/v1/segments")).await?;
    assert_eq!((status, body), (200, json!({"segments": []})));
    assert_eq!(t.sim().people_count(), 0);
    Ok(())
}
