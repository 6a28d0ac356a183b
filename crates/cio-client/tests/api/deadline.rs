//! Sending calls fenced by a deadline: refused before anything leaves when the rate limiter
//! cannot let them start by `deadline - timeout`, sent normally otherwise.

use std::time::{Duration, Instant};

use cio_client::{CioClient, NewNewsletter, Recipients, SendError, Trigger};
use cio_sim::{Fault, RunningSim, SimApi};
use serde_json::{Map, json};

use crate::helpers::{config, requests_to, spawn_sim};

fn broadcast(running: &RunningSim) -> i64 {
    running
        .sim
        .broadcasts()
        .into_iter()
        .find(|b| b.name == "Assignment Alert")
        .map(|b| b.id)
        .unwrap()
}

fn trigger() -> Trigger {
    Trigger {
        recipients: Recipients::Default,
        data: Map::new(),
    }
}

fn posts(running: &RunningSim, prefix: &str) -> usize {
    requests_to(running, prefix)
        .into_iter()
        .filter(|r| r.method == "POST")
        .count()
}

#[tokio::test]
async fn a_send_that_cannot_start_in_time_is_not_sent_at_all() {
    let running = spawn_sim().await;
    let client = CioClient::new(config(&running)).unwrap();
    assert_eq!(client.timeout(), Duration::from_secs(5));
    let broadcast = broadcast(&running);
    // The trigger window is taken: Customer.io answers 429 with Retry-After 10, which pauses
    // triggers in this process for 10 s.
    client
        .trigger_broadcast(broadcast, &trigger())
        .await
        .unwrap();
    assert!(
        client
            .trigger_broadcast(broadcast, &trigger())
            .await
            .is_err()
    );
    running.sim.set_trigger_interval(Duration::ZERO); // the server would accept one now
    assert_eq!(posts(&running, "/v1/campaigns/"), 2);

    // Deadline in 8 s: it would have to start within 3 s, the pause lasts ~10 s.
    let started = Instant::now();
    let err = client
        .with_deadline(Instant::now() + Duration::from_secs(8))
        .trigger_broadcast(broadcast, &trigger())
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(200), "it waited");
    let SendError::NotSent(not_sent) = &err else {
        panic!("{err:?}")
    };
    let wait = not_sent.earliest_start_in.unwrap();
    assert!(
        wait > Duration::from_secs(8) && wait <= Duration::from_secs(10),
        "{wait:?}"
    );
    assert!(err.is_not_sent() && !err.is_outcome_unknown());
    assert_eq!(
        posts(&running, "/v1/campaigns/"),
        2,
        "nothing left the process"
    );
    assert_eq!(running.sim.triggers(Some(broadcast)).len(), 1);

    // A deadline that leaves less than the request timeout is refused even with no wait.
    let err = client
        .with_deadline(Instant::now() + Duration::from_secs(4))
        .create_newsletter(&NewNewsletter::email(
            "n",
            json!({"segment": {"id": 1}}),
            "s",
            "<p>b</p>",
        ))
        .await
        .unwrap_err();
    assert!(err.is_not_sent(), "{err:?}");
    assert_eq!(posts(&running, "/v1/newsletters"), 0);

    // An API-wide pause (a 429 on a read, from another client) holds newsletter sends too.
    running.sim.push_faults(
        Some(SimApi::App),
        [Fault::Status {
            status: 429,
            retry_after_secs: Some(30),
        }],
    );
    let mut no_retry = config(&running);
    no_retry.retry = cio_client::RetryConfig::disabled();
    let reader = CioClient::new(no_retry).unwrap();
    assert!(reader.list_segments().await.is_err()); // pauses the App API for 30 s
    let newsletter = running.sim.newsletters()[0].id;
    let err = client
        .with_deadline(Instant::now() + Duration::from_secs(20))
        .send_newsletter(newsletter)
        .await
        .unwrap_err();
    assert!(err.is_not_sent(), "{err:?}");
    assert!(requests_to(&running, &format!("/v1/newsletters/{newsletter}/send")).is_empty());
}

#[tokio::test]
async fn a_send_with_time_to_spare_waits_its_turn_and_goes() {
    let running = spawn_sim().await;
    let client = CioClient::new(config(&running)).unwrap();
    let broadcast = broadcast(&running);
    running.sim.set_trigger_interval(Duration::from_secs(2));
    client
        .trigger_broadcast(broadcast, &trigger())
        .await
        .unwrap();
    assert!(
        client
            .trigger_broadcast(broadcast, &trigger())
            .await
            .is_err()
    ); // 429, 2 s

    // Far enough: it waits out the 2 s pause within its deadline, then is sent once.
    let started = Instant::now();
    let id = client
        .with_deadline(Instant::now() + Duration::from_secs(60))
        .trigger_broadcast(broadcast, &trigger())
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(running.sim.trigger(id).unwrap().broadcast_id, broadcast);
    assert_eq!(posts(&running, "/v1/campaigns/"), 3);

    // Newsletter create and send through the fenced handle.
    let fenced = client.with_deadline(tokio::time::Instant::now() + Duration::from_secs(60));
    let created = fenced
        .create_newsletter(&NewNewsletter::email(
            "fenced",
            json!({"segment": {"id": 1}}),
            "s",
            "<p>b</p>",
        ))
        .await
        .unwrap();
    fenced.send_newsletter(created.id).await.unwrap();
    assert!(
        running
            .sim
            .newsletter(created.id)
            .unwrap()
            .sent_at
            .is_some()
    );
}

#[tokio::test]
async fn a_lost_answer_within_the_deadline_is_outcome_unknown_not_not_sent() {
    let running = spawn_sim().await;
    let client = CioClient::new(config(&running)).unwrap();
    let broadcast = broadcast(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
    let err = client
        .with_deadline(Instant::now() + Duration::from_secs(60))
        .trigger_broadcast(broadcast, &trigger())
        .await
        .unwrap_err();
    assert!(!err.is_not_sent() && err.is_outcome_unknown(), "{err:?}");
    assert_eq!(running.sim.triggers(Some(broadcast)).len(), 1);
}
