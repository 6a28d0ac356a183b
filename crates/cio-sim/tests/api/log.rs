//! Request log ring buffer, never-dropping counters, `/_sim/stats` and `/_sim/events`, and the
//! Track rate limit under sustained load.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;

use crate::events::ulid;
use crate::helpers::{TestSim, empty_unlimited, send, spawn, status_of};
use cio_sim::{RateLimitMode, SimApi, SimConfig};

#[tokio::test]
async fn request_log_is_a_ring_buffer_and_counters_never_drop() -> anyhow::Result<()> {
    let t = spawn(SimConfig {
        request_log_capacity: 5,
        ..empty_unlimited()
    })
    .await?;
    assert_eq!(SimConfig::demo().request_log_capacity, 10_000);
    assert_eq!(SimConfig::default().request_log_capacity, 10_000);

    for i in 0..6 {
        let put = t
            .track(Method::PUT, &format!("/api/v1/customers/u{i}"))
            .json(&json!({"n": i}));
        assert_eq!(status_of(put).await?, 200);
    }
    assert_eq!(
        status_of(t.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/u1/attributes")).await?,
        200
    );
    assert_eq!(
        status_of(t.app(Method::GET, "/v1/customers/u2/attributes")).await?,
        200
    );
    assert_eq!(status_of(t.track(Method::GET, "/api/v1/nope")).await?, 404);
    // Rejected by auth: still counted under its route.
    assert_eq!(
        status_of(t.control(Method::POST, "/api/v2/batch")).await?,
        401
    );
    // Control requests are neither logged nor counted.
    assert_eq!(
        status_of(t.control(Method::GET, "/_sim/health")).await?,
        200
    );

    let log = t.sim().requests();
    let paths: Vec<&str> = log.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/accounts/region",
            "/v1/customers/u1/attributes",
            "/v1/customers/u2/attributes",
            "/api/v1/nope",
            "/api/v2/batch",
        ],
        "only the 5 most recent are kept"
    );
    assert_eq!(t.sim().request_count(SimApi::Track), 9);
    assert_eq!(t.sim().request_count(SimApi::App), 2);
    let by_route = t.sim().request_counts_by_route();
    assert_eq!(by_route.get("PUT /api/v1/customers/{identifier}"), Some(&6));
    assert_eq!(by_route.get("GET /api/v1/accounts/region"), Some(&1));
    assert_eq!(
        by_route.get("GET /v1/customers/{customer_id}/attributes"),
        Some(&2)
    );
    assert_eq!(by_route.get("GET (no route)"), Some(&1));
    assert_eq!(by_route.get("POST /api/v2/batch"), Some(&1));
    assert_eq!(by_route.values().sum::<u64>(), 11);

    // Clearing the log keeps the counters.
    t.sim().clear_requests();
    assert!(t.sim().requests().is_empty());
    assert_eq!(t.sim().request_count(SimApi::Track), 9);

    // Capacity 0 keeps no log at all, but counts.
    let none = spawn(SimConfig {
        request_log_capacity: 0,
        ..empty_unlimited()
    })
    .await?;
    assert_eq!(
        status_of(none.track(Method::GET, "/api/v1/accounts/region")).await?,
        200
    );
    assert!(none.sim().requests().is_empty());
    assert_eq!(none.sim().request_count(SimApi::Track), 1);
    Ok(())
}

#[tokio::test]
async fn large_bodies_are_logged_truncated() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let ops: Vec<_> = (0..80)
        .map(|i| {
            json!({"type": "person", "identifiers": {"id": format!("u{i}")}, "action": "identify",
                   "attributes": {"blob": "x".repeat(900)}})
        })
        .collect();
    let body = serde_json::to_vec(&json!({ "batch": ops }))?;
    let size = body.len();
    assert!(size > 64 * 1024);
    let post = t
        .track(Method::POST, "/api/v2/batch")
        .header("content-type", "application/json")
        .body(body);
    assert_eq!(status_of(post).await?, 200);
    let small = t
        .track(Method::POST, "/api/v2/entity")
        .json(&json!({"type": "person", "identifiers": {"id": "s"}, "action": "delete"}));
    assert_eq!(status_of(small).await?, 200);

    let log = t.sim().requests();
    assert_eq!(log[0].body, Some(json!({ "_truncated": size })));
    assert_eq!(
        log[1].body.as_ref().map(|b| b["action"].clone()),
        Some(json!("delete"))
    );
    assert_eq!(
        t.sim().people_count(),
        80,
        "truncation affects only the log"
    );
    Ok(())
}

#[tokio::test]
async fn stats_and_events_over_http() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let event = |who: &str, id: u64| {
        t.track(Method::POST, &format!("/api/v1/customers/{who}/events"))
            .json(&json!({"name": "opened", "id": ulid(id), "data": {"k": id}}))
    };
    assert_eq!(status_of(event("u1", 1)).await?, 200);
    assert_eq!(status_of(event("u1", 1)).await?, 200);
    assert_eq!(status_of(event("u2", 2)).await?, 200);
    let anon = t
        .track(Method::POST, "/api/v1/events")
        .json(&json!({"name": "visit", "anonymous_id": "ck"}));
    assert_eq!(status_of(anon).await?, 200);

    let (status, body) = send(t.control(Method::GET, "/_sim/events?person=u1")).await?;
    assert_eq!(status, 200);
    let events = body["events"].as_array().cloned().unwrap_or_default();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["person_id"], "u1");
    assert_eq!(events[0]["id"], ulid(1));
    assert_eq!(events[0]["data"], json!({"k": 1}));
    assert!(events[0]["received_at"].is_string());
    let (_, body) = send(t.control(Method::GET, "/_sim/events")).await?;
    assert_eq!(body["events"].as_array().map(Vec::len), Some(3));
    let (_, body) = send(t.control(Method::GET, "/_sim/events?anonymous_id=ck")).await?;
    assert_eq!(body["events"][0]["name"], "visit");
    let (_, body) = send(t.control(Method::GET, "/_sim/events?person=nobody")).await?;
    assert_eq!(body, json!({"events": []}));

    let (status, stats) = send(t.control(Method::GET, "/_sim/stats")).await?;
    assert_eq!(status, 200);
    assert_eq!(stats["people"], 2);
    assert_eq!(stats["events"], 3);
    assert_eq!(stats["duplicate_events_dropped"], 1);
    assert_eq!(stats["requests"]["track"], 4);
    assert_eq!(stats["requests"]["app"], 0);
    assert_eq!(
        stats["requests"]["by_route"]["POST /api/v1/customers/{identifier}/events"],
        3
    );
    assert_eq!(stats["requests"]["by_route"]["POST /api/v1/events"], 1);
    assert_eq!(stats["request_log"], json!({"len": 4, "capacity": 10_000}));
    Ok(())
}

/// Eight workers hammer `GET /api/v1/accounts/region` for 1.5 s; returns (accepted, limited,
/// seconds taken).
/// A workspace whose request log keeps every request of a [`hammer_track`] run (thousands of
/// 429s in 1.5 s on a fast machine would push the first accepted ones out of the default 10,000).
fn hammer_config() -> SimConfig {
    SimConfig {
        request_log_capacity: 1_000_000,
        ..empty_unlimited()
    }
}

async fn hammer_track(t: &TestSim) -> anyhow::Result<(u64, u64, f64)> {
    let started = Instant::now();
    let deadline = started + Duration::from_millis(1500);
    let mut workers = Vec::new();
    for _ in 0..8 {
        let request = t.track(Method::GET, "/api/v1/accounts/region");
        workers.push(tokio::spawn(async move {
            let (mut ok, mut limited, mut retry_after_ok) = (0u64, 0u64, true);
            while Instant::now() < deadline {
                let Some(request) = request.try_clone() else {
                    break;
                };
                let response = request.send().await?;
                match response.status().as_u16() {
                    200 => ok += 1,
                    429 => {
                        limited += 1;
                        let secs = response
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse::<u64>().ok());
                        retry_after_ok &= secs.is_some_and(|s| s >= 1);
                    }
                    other => anyhow::bail!("unexpected status {other}"),
                }
            }
            Ok::<_, anyhow::Error>((ok, limited, retry_after_ok))
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for worker in workers {
        let (o, l, retry_after_ok) = worker.await??;
        assert!(retry_after_ok, "every 429 carries Retry-After >= 1");
        ok += o;
        limited += l;
    }
    Ok((ok, limited, started.elapsed().as_secs_f64()))
}

#[tokio::test]
async fn track_token_bucket_holds_a_steady_100_per_second() -> anyhow::Result<()> {
    let t = spawn(hammer_config()).await?;
    t.sim().set_rate_limit(SimApi::Track, 100);
    t.sim()
        .set_rate_limit_mode(SimApi::Track, RateLimitMode::TokenBucket);
    let (ok, limited, elapsed) = hammer_track(&t).await?;
    // A full bucket of 100, then 100 per second.
    let expected = 100.0 + 100.0 * elapsed;
    assert!(limited > 0, "the limit was never hit");
    assert!(
        (ok as f64) <= expected + 2.0 && (ok as f64) >= expected - 30.0,
        "{ok} accepted in {elapsed:.2}s, expected about {expected:.0} ({limited} limited)"
    );
    assert_eq!(t.sim().request_count(SimApi::Track), ok + limited);
    Ok(())
}

#[tokio::test]
async fn track_rolling_window_never_admits_more_than_100_in_a_second() -> anyhow::Result<()> {
    let t = spawn(hammer_config()).await?;
    t.sim().set_rate_limit(SimApi::Track, 100);
    assert_eq!(
        t.sim().rate_limit_mode(SimApi::Track),
        RateLimitMode::Rolling
    );
    let (ok, limited, elapsed) = hammer_track(&t).await?;
    assert!(limited > 0, "the limit was never hit");
    // 100 at once, then (as the first ones age out after 1 s) up to 100 more.
    assert!(
        (100..=200).contains(&ok) && elapsed < 2.0,
        "{ok} accepted in {elapsed:.2}s"
    );
    // No second of the log holds more than 100 accepted requests (the log's clock is read
    // a moment before the limiter's: allow 5 ms).
    let accepted: Vec<_> = t
        .sim()
        .requests()
        .into_iter()
        .filter(|r| r.status == 200)
        .map(|r| r.at)
        .collect();
    assert_eq!(accepted.len() as u64, ok);
    let window = chrono::TimeDelta::milliseconds(995);
    let busiest = (0..accepted.len())
        .map(|i| {
            accepted[i..]
                .iter()
                .take_while(|at| **at - accepted[i] < window)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(busiest <= 100, "{busiest} accepted within one second");
    Ok(())
}
