//! Retries, Retry-After, timeouts, dropped connections, and endpoints that are never retried.

use std::time::{Duration, Instant};

use cio_client::{Api, CioClient, CioError, RetryConfig};
use cio_sim::{Fault, SimApi};

use crate::helpers::{client, config, gap_ms, requests_to, spawn_empty_sim};

fn status(status: u16, retry_after_secs: Option<u64>) -> Fault {
    Fault::Status {
        status,
        retry_after_secs,
    }
}

#[tokio::test]
async fn rate_limited_call_waits_retry_after_then_succeeds() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [status(429, Some(1))]);
    let started = Instant::now();
    client.list_segments().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );

    let logged = requests_to(&running, "/v1/segments");
    assert_eq!(
        logged.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![429, 200]
    );
    let gap = gap_ms(&logged[0], &logged[1]);
    assert!((950..2500).contains(&gap), "retried after {gap} ms");
}

#[tokio::test]
async fn rate_limit_that_outlasts_retries_is_rate_limited() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.retry.max_retries = 1;
    cfg.retry.max_throttle_wait = Duration::ZERO; // 429s count as ordinary retries
    let client = CioClient::new(cfg).unwrap();
    running.sim.push_faults(
        Some(SimApi::App),
        [status(429, Some(1)), status(429, Some(1))],
    );
    let err = client.list_segments().await.unwrap_err();
    assert!(
        matches!(err, CioError::RateLimited { api: Api::App, retry_after: Some(d) } if d == Duration::from_secs(1)),
        "{err:?}"
    );
    assert!(err.is_retryable() && !err.is_outcome_unknown());
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(requests_to(&running, "/v1/").len(), 2);
}

#[tokio::test]
async fn a_429_storm_is_waited_out_without_spending_retries() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.retry.max_retries = 0;
    cfg.retry.max_throttle_wait = Duration::from_secs(10);
    let client = CioClient::new(cfg).unwrap();
    running
        .sim
        .push_faults(Some(SimApi::App), (0..3).map(|_| status(429, Some(1))));
    let started = std::time::Instant::now();
    client.list_segments().await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(2900),
        "{:?}",
        started.elapsed()
    );
    let statuses: Vec<u16> = requests_to(&running, "/v1/")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![429, 429, 429, 200]);
}

#[tokio::test]
async fn server_error_is_retried_then_succeeds() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::Track), [status(500, None), status(503, None)]);
    client.account_region().await.unwrap();
    let logged = requests_to(&running, "/api/");
    assert_eq!(
        logged.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![500, 503, 200]
    );
}

#[tokio::test]
async fn server_error_that_outlasts_retries_is_server() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), (0..4).map(|_| status(500, None)));
    let err = client.list_segments().await.unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Server {
                api: Api::App,
                status: 500
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable() && !err.is_outcome_unknown());
    // The first attempt and 3 retries.
    assert_eq!(requests_to(&running, "/v1/").len(), 4);
}

#[tokio::test]
async fn timeout_is_retried_for_idempotent_calls() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.timeout = Duration::from_millis(300);
    let client = CioClient::new(cfg).unwrap();
    running.sim.push_faults(
        Some(SimApi::App),
        [Fault::Delay(Duration::from_millis(800))],
    );
    client.list_segments().await.unwrap();
    // The simulator neither processes nor logs a request the client abandoned during its
    // delay; the consumed fault shows the first attempt happened.
    assert_eq!(running.sim.queued_faults(), 0);
    let statuses: Vec<u16> = requests_to(&running, "/v1/")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![200]);
}

#[tokio::test]
async fn timeout_that_outlasts_retries_is_timeout() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.timeout = Duration::from_millis(200);
    cfg.retry.max_retries = 1;
    let client = CioClient::new(cfg).unwrap();
    running.sim.push_faults(
        Some(SimApi::App),
        (0..3).map(|_| Fault::Delay(Duration::from_millis(600))),
    );
    let started = Instant::now();
    let err = client.get_segment(1).await.unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Timeout {
                api: Api::App,
                endpoint: "/v1/segments/{segment_id}"
            }
        ),
        "{err:?}"
    );
    assert!(err.is_retryable());
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    // Exactly two attempts (first + 1 retry) consumed two of the three delays.
    assert_eq!(running.sim.queued_faults(), 1);
}

#[tokio::test]
async fn dropped_connections_are_retried_for_idempotent_calls() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [Fault::Drop, Fault::AcceptThenDrop]);
    client.list_segments().await.unwrap();
    let statuses: Vec<u16> = requests_to(&running, "/v1/")
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(statuses, vec![0, 0, 200]);
}

#[tokio::test]
async fn dropped_connections_that_outlast_retries_are_transport_errors() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), (0..4).map(|_| Fault::Drop));
    let err = client.list_segments().await.unwrap_err();
    let CioError::Transport {
        api,
        endpoint,
        message,
        maybe_sent,
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!((*api, *endpoint), (Api::App, "/v1/segments"));
    assert!(*maybe_sent);
    assert!(!message.contains("127.0.0.1"), "URL leaked into {message}");
    assert_eq!(requests_to(&running, "/v1/").len(), 4);
}

#[tokio::test]
async fn connection_refused_is_a_transport_error_that_provably_never_left() {
    // Bind, learn the port, close: nothing listens there any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running).with_base_url(url::Url::parse(&base).unwrap());
    cfg.retry = RetryConfig {
        max_retries: 1,
        base_delay: Duration::from_millis(10),
        max_delay: Duration::from_millis(10),
        max_throttle_wait: Duration::ZERO,
    };
    let client = CioClient::new(cfg).unwrap();
    // Even a NeverRetry call: the request never left, so the outcome is known.
    let err = client.create_manual_segment("x", None).await.unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Transport {
                maybe_sent: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_outcome_unknown());
    assert!(err.is_retryable());
}

// ----- NeverRetry endpoints (creating a manual segment stands in for the sends to come) -----

#[tokio::test]
async fn never_retry_endpoint_is_not_retried_on_server_error() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [status(500, None), status(500, None)]);
    let err = client
        .create_manual_segment("once", None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, CioError::Server { status: 500, .. }),
        "{err:?}"
    );
    assert!(!err.is_outcome_unknown());
    assert_eq!(requests_to(&running, "/v1/").len(), 1);
    assert_eq!(running.sim.queued_faults(), 1);
}

#[tokio::test]
async fn never_retry_endpoint_is_not_retried_on_429() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [status(429, Some(1))]);
    let err = client
        .create_manual_segment("once", None)
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(requests_to(&running, "/v1/").len(), 1);
}

#[tokio::test]
async fn never_retry_endpoint_timeout_has_unknown_outcome() {
    let running = spawn_empty_sim().await;
    let mut cfg = config(&running);
    cfg.timeout = Duration::from_millis(200);
    let client = CioClient::new(cfg).unwrap();
    running.sim.push_faults(
        Some(SimApi::App),
        (0..2).map(|_| Fault::Delay(Duration::from_millis(600))),
    );
    let err = client
        .create_manual_segment("maybe", None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Timeout {
                api: Api::App,
                endpoint: "/v1/segments"
            }
        ),
        "{err:?}"
    );
    assert!(err.is_outcome_unknown());
    // One attempt only: the call has returned, so nothing can try again; the second delay is
    // still queued.
    assert_eq!(running.sim.queued_faults(), 1);
}

#[tokio::test]
async fn never_retry_endpoint_lost_answer_has_unknown_outcome() {
    let running = spawn_empty_sim().await;
    let client = client(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
    let err = client
        .create_manual_segment("maybe", None)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CioError::Transport {
                maybe_sent: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_outcome_unknown());
    assert_eq!(requests_to(&running, "/v1/").len(), 1);
    // Processed although the caller never heard back.
    assert_eq!(running.sim.segments().len(), 1);
}
