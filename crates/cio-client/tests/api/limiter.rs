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
    // Let `a` receive its 429 first.
    tokio::time::sleep(Duration::from_millis(300)).await;
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
