//! The per-workspace limiter shared by every client in the process.

use std::time::{Duration, Instant};

use cio_client::CioClient;
use cio_sim::{Fault, SimApi};

use crate::helpers::{config, gap_ms, requests_to, spawn_empty_sim};

#[tokio::test]
async fn two_clients_of_one_workspace_share_one_pace() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.app_requests_per_sec = 5; // below the simulator's 10/s: no 429 expected
    let a = CioClient::new(cfg.clone()).unwrap();
    let b = CioClient::new(cfg).unwrap();

    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let client = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move { client.list_segments().await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    // 10 requests at 5/s: the last may start 1.8 s after the first.
    assert!(
        started.elapsed() >= Duration::from_millis(1700),
        "{:?}",
        started.elapsed()
    );

    let logged = requests_to(&running, "/v1/");
    assert_eq!(logged.len(), 10);
    assert!(logged.iter().all(|r| r.status == 200));
    let mut at: Vec<_> = logged.iter().collect();
    at.sort_by_key(|r| r.at);
    for pair in at.windows(2) {
        let gap = gap_ms(pair[0], pair[1]);
        assert!(gap >= 150, "requests {gap} ms apart at 5/s");
    }
    let span = gap_ms(at[0], at[9]);
    assert!(span >= 1700, "10 requests spread over {span} ms");
}

#[tokio::test]
async fn clients_of_different_workspaces_do_not_share() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.app_requests_per_sec = 2;
    let a = CioClient::new(cfg.clone()).unwrap();
    cfg.credentials.site_id = "another-workspace".to_owned();
    let b = CioClient::new(cfg).unwrap();
    // One request each: neither waits for the other's 500 ms slot.
    let (ra, rb) = tokio::join!(a.list_segments(), b.list_segments());
    ra.unwrap();
    rb.unwrap();
    let logged = requests_to(&running, "/v1/");
    assert_eq!(logged.len(), 2);
    let gap = gap_ms(&logged[0], &logged[1]).abs();
    assert!(gap < 400, "requests {gap} ms apart");
}

#[tokio::test]
async fn a_429_with_retry_after_pauses_every_caller() {
    let running = spawn_empty_sim().await;
    let cfg = config(&running);
    let a = CioClient::new(cfg.clone()).unwrap();
    let b = CioClient::new(cfg).unwrap();
    running.sim.push_faults(
        Some(SimApi::App),
        [Fault::Status {
            status: 429,
            retry_after_secs: Some(1),
        }],
    );
    // `b` calls while `a` is waiting out the 429's Retry-After.
    let a_task = tokio::spawn(async move { a.list_segments().await });
    // Once `a` has received its 429.
    while !requests_to(&running, "/v1/")
        .iter()
        .any(|r| r.status == 429)
    {
        tokio::task::yield_now().await;
    }
    b.list_segments().await.unwrap();
    a_task.await.unwrap().unwrap();

    let logged = requests_to(&running, "/v1/");
    assert_eq!(logged.len(), 3);
    assert_eq!(logged[0].status, 429);
    // Both later requests waited for the pause to end, b's included.
    for later in &logged[1..] {
        let gap = gap_ms(&logged[0], later);
        assert!(gap >= 950, "request {gap} ms after the 429");
    }
}

#[tokio::test]
async fn a_trigger_429_holds_back_triggers_only() {
    let running = crate::helpers::spawn_sim().await;
    let client = crate::helpers::client(&running);
    let broadcast = running
        .sim
        .broadcasts()
        .into_iter()
        .find(|b| b.name == "Assignment Alert")
        .unwrap()
        .id;
    let trigger = cio_client::Trigger {
        recipients: cio_client::Recipients::Default,
        data: serde_json::Map::new(),
    };
    client.trigger_broadcast(broadcast, &trigger).await.unwrap();
    // Customer.io's one-trigger-per-10-s window: a 429 with Retry-After 10.
    let err = client
        .trigger_broadcast(broadcast, &trigger)
        .await
        .unwrap_err();
    let retry_after = err.retry_after().unwrap();
    assert!(retry_after >= Duration::from_secs(9), "{err:?}");

    // Reads of the same API go out at once...
    let started = Instant::now();
    client.list_segments().await.unwrap();
    client.segment_customer_count(1).await.unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "reads waited {:?} behind the trigger's 429",
        started.elapsed()
    );
    // ...while a further trigger, even through another client, must wait out the pause: with a
    // deadline 3 s away it cannot start in time and is refused before anything leaves.
    let other = crate::helpers::client(&running);
    let refused = other
        .with_deadline(tokio::time::Instant::now() + Duration::from_secs(3))
        .trigger_broadcast(broadcast, &trigger)
        .await;
    assert!(
        refused.as_ref().is_err_and(|e| e.is_not_sent()),
        "{refused:?}"
    );
    let trigger_posts: Vec<u16> = requests_to(&running, "/v1/campaigns/")
        .into_iter()
        .filter(|r| r.method == "POST")
        .map(|r| r.status)
        .collect();
    assert_eq!(trigger_posts, [200, 429], "the third trigger was held back");
}

#[tokio::test]
async fn reads_never_exceed_ten_in_any_rolling_second() {
    // The simulator's App limit: 10 requests in any rolling second (its default mode).
    let running = crate::helpers::spawn_sim().await;
    assert_eq!(running.sim.rate_limit(SimApi::App), 10);
    assert_eq!(
        running.sim.rate_limit_mode(SimApi::App),
        cio_sim::RateLimitMode::Rolling
    );
    let client = crate::helpers::client(&running);
    let segments: Vec<i64> = running.sim.segments().iter().map(|s| s.id).collect();
    // The first request reaches the server late (a slow connection set-up): paced starts
    // alone would put eleven arrivals within one second.
    running.sim.push_faults(
        Some(SimApi::App),
        [Fault::Delay(Duration::from_millis(300))],
    );
    const READS: usize = 35;
    let started = Instant::now();
    let tasks: Vec<_> = (0..READS)
        .map(|i| {
            let client = client.clone();
            let id = segments[i % segments.len()];
            tokio::spawn(async move { client.segment_customer_count(id).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let took = started.elapsed();

    let logged = requests_to(&running, "/v1/segments/");
    let limited = logged.iter().filter(|r| r.status == 429).count();
    assert_eq!(limited, 0, "429s: {limited}");
    assert_eq!(logged.len(), READS, "no request was sent twice");
    // About N / limit: 35 reads at 10/s, plus the slow first answer's window.
    assert!(
        took >= Duration::from_millis(3300) && took < Duration::from_millis(4800),
        "{READS} reads took {took:?}"
    );
}
