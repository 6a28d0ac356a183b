//! Reporting webhooks: every delivery event POSTed signed, in order, at least once; a failing
//! event holds back the rest and is retried on the simulator's clock; duplicates; control API.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use reqwest::Method;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::helpers::{TestSim, empty_unlimited, send, spawn, status_of};
use cio_sim::{
    AudienceFilter, DeliveryRates, NewNewsletter, ReportingWebhook, SimWebhook, sign_webhook,
};

const KEY: &str = "whsec-test-key";

#[derive(Debug, Clone)]
enum Answer {
    Status(u16),
    Hang(Duration),
}

#[derive(Debug, Clone)]
struct Received {
    timestamp: String,
    signature: String,
    body: String,
}

impl Received {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    fn signed_correctly(&self) -> bool {
        let ts: i64 = self.timestamp.parse().unwrap_or(-1);
        sign_webhook(KEY, ts, self.body.as_bytes()) == self.signature
    }
}

#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Mutex<VecDeque<Answer>>>,
}

impl Receiver {
    fn received(&self) -> Vec<Received> {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn answer_next(&self, answers: impl IntoIterator<Item = Answer>) {
        if let Ok(mut script) = self.script.lock() {
            script.extend(answers);
        }
    }
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    if let Ok(mut received) = r.received.lock() {
        received.push(Received {
            timestamp: header("x-cio-timestamp"),
            signature: header("x-cio-signature"),
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    let answer = r.script.lock().ok().and_then(|mut s| s.pop_front());
    match answer {
        None => StatusCode::OK,
        Some(Answer::Status(status)) => {
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        }
        Some(Answer::Hang(d)) => {
            tokio::time::sleep(d).await;
            StatusCode::OK
        }
    }
}

async fn receiver() -> anyhow::Result<(Receiver, String)> {
    let state = Receiver::default();
    let app = Router::new()
        .route("/hooks", post(receive))
        .with_state(state.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/hooks", listener.local_addr()?);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((state, url))
}

fn people(t: &TestSim, ids: &[&str]) {
    for id in ids {
        let attrs = json!({"email": format!("{id}@example.com")});
        t.sim()
            .upsert_person(id, attrs.as_object().cloned().unwrap_or_default());
    }
}

fn newsletter(t: &TestSim) -> anyhow::Result<i64> {
    let id = t.sim().add_newsletter(NewNewsletter::new(
        "Weekly",
        "Markets",
        "<p>x</p>",
        AudienceFilter::attribute_exists("email"),
    ))?;
    t.sim().send_newsletter(id)?;
    Ok(id)
}

async fn settled(t: &TestSim) -> anyhow::Result<()> {
    anyhow::ensure!(
        t.sim().webhooks_settled(Duration::from_secs(10)).await,
        "webhooks did not settle: {:?}",
        t.sim().webhook_ledger()
    );
    Ok(())
}

#[tokio::test]
async fn every_delivery_event_is_posted_signed_and_in_order() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t, &["a", "b"]);
    // Before the webhook: not reported.
    t.sim().set_default_rates(DeliveryRates::none())?;
    newsletter(&t)?;
    let (rx, url) = receiver().await?;
    t.sim()
        .set_reporting_webhook(Some(ReportingWebhook::new(&url, KEY)))?;
    t.sim().set_default_rates(DeliveryRates {
        bounce_rate: 0.0,
        ..DeliveryRates::all()
    })?;
    let newsletter = newsletter(&t)?;
    t.sim().advance(Duration::from_secs(10 * 24 * 3600));
    settled(&t).await?;

    let received = rx.received();
    assert!(received.iter().all(Received::signed_correctly));
    let bodies: Vec<Value> = received.iter().map(Received::json).collect();
    let ids: BTreeSet<&str> = bodies
        .iter()
        .filter_map(|b| b["event_id"].as_str())
        .collect();
    assert_eq!(ids.len(), bodies.len(), "event ids are unique");
    let ledger = t.sim().webhook_ledger();
    assert_eq!(ledger.len(), bodies.len());
    assert!(ledger.iter().all(SimWebhook::delivered));
    for (sent, body) in ledger.iter().zip(&bodies) {
        assert_eq!(&sent.body_json(), body, "the ledger holds what was sent");
    }
    // Overall and per delivery, in the order things happened.
    let times: Vec<i64> = bodies
        .iter()
        .filter_map(|b| b["timestamp"].as_i64())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let mut per_delivery: HashMap<String, Vec<&Value>> = HashMap::new();
    for b in &bodies {
        let delivery = b["data"]["delivery_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        per_delivery.entry(delivery).or_default().push(b);
    }
    // The first newsletter's deliveries were sent before the webhook existed: only what
    // happened to them afterwards (delivery, a few seconds later) is reported.
    let (earlier, later): (Vec<_>, Vec<_>) = per_delivery
        .iter()
        .partition(|(_, events)| events.iter().all(|b| b["metric"] != "sent"));
    assert_eq!((earlier.len(), later.len()), (2, 2));
    for (_, events) in &earlier {
        let metrics: Vec<&str> = events.iter().filter_map(|b| b["metric"].as_str()).collect();
        assert_eq!(metrics, vec!["delivered"]);
    }
    for (delivery, events) in later {
        let metrics: Vec<&str> = events.iter().filter_map(|b| b["metric"].as_str()).collect();
        assert_eq!(metrics.first(), Some(&"sent"), "{delivery}: {metrics:?}");
        assert_eq!(
            metrics.get(1),
            Some(&"delivered"),
            "{delivery}: {metrics:?}"
        );
        let kinds: BTreeSet<&str> = metrics.iter().copied().collect();
        let want: BTreeSet<&str> = [
            "sent",
            "delivered",
            "opened",
            "clicked",
            "converted",
            "spammed",
            "unsubscribed",
        ]
        .into_iter()
        .collect();
        assert_eq!(kinds, want);
        for b in events {
            assert_eq!(b["object_type"], "email");
            let data = &b["data"];
            assert_eq!(data["newsletter_id"], newsletter);
            assert!(data["content_id"].is_i64());
            assert!(data["broadcast_id"].is_null() && data["campaign_id"].is_null());
            assert_eq!(data["identifiers"]["email"], data["recipient"]);
            assert_eq!(data["subject"], "Markets");
            assert!(data["identifiers"]["cio_id"].is_string());
            match b["metric"].as_str() {
                Some("opened") => {
                    assert!(data["prefetched"].is_boolean() && data["proxied"].is_boolean());
                    assert!(data["synthetic"].is_boolean());
                }
                Some("clicked") => {
                    assert!(data["machine"].is_boolean());
                    assert!(
                        data["href"]
                            .as_str()
                            .is_some_and(|h| h.starts_with("https://"))
                    );
                    assert!(data["link_id"].is_i64());
                }
                _ => {}
            }
        }
        // Every delivery: one machine open (prefetched) and one human open, plus a synthetic
        // one when the link scanner clicked before anything opened; a machine and a human
        // click.
        let opens = |prefetched: bool, synthetic: bool| {
            events
                .iter()
                .filter(|b| {
                    b["metric"] == "opened"
                        && b["data"]["prefetched"] == prefetched
                        && b["data"]["synthetic"] == synthetic
                })
                .count()
        };
        assert_eq!(
            (opens(true, false), opens(false, false)),
            (1, 1),
            "{delivery}"
        );
        assert!(opens(false, true) <= 1);
        let mut machine: Vec<bool> = events
            .iter()
            .filter(|b| b["metric"] == "clicked")
            .filter_map(|b| b["data"]["machine"].as_bool())
            .collect();
        machine.sort();
        assert_eq!(machine, vec![false, true], "{delivery}");
    }
    Ok(())
}

#[tokio::test]
async fn a_failing_event_holds_back_the_rest_until_it_succeeds() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t, &["a", "b"]);
    t.sim().set_default_rates(DeliveryRates::none())?;
    let (rx, url) = receiver().await?;
    rx.answer_next([Answer::Status(500)]);
    t.sim()
        .set_reporting_webhook(Some(ReportingWebhook::new(&url, KEY)))?;
    newsletter(&t)?;
    t.sim().advance(Duration::from_secs(120));
    settled(&t).await?;
    // One attempt, refused: nothing behind it went out.
    assert_eq!(rx.received().len(), 1);
    let ledger = t.sim().webhook_ledger();
    assert_eq!(ledger.len(), 4, "sent and delivered for two deliveries");
    assert_eq!(ledger[0].attempts.len(), 1);
    assert_eq!(ledger[0].attempts[0].status, Some(500));
    assert!(ledger[1..].iter().all(|w| w.attempts.is_empty()));

    // A 500 waits an hour before the retry.
    t.sim().advance(Duration::from_secs(59 * 60));
    settled(&t).await?;
    assert_eq!(rx.received().len(), 1);
    t.sim().advance(Duration::from_secs(2 * 60));
    settled(&t).await?;
    let received = rx.received();
    assert_eq!(received.len(), 5);
    assert_eq!(
        received[0].json()["event_id"],
        received[1].json()["event_id"]
    );
    // Each attempt is signed with the current (wall-clock) time, which the receiver checks
    // against its own clock.
    let now = chrono::Utc::now().timestamp();
    for r in &received {
        let signed: i64 = r.timestamp.parse().unwrap_or(0);
        assert!((now - signed).abs() <= 5, "{signed} vs {now}");
    }
    assert!(received.iter().all(Received::signed_correctly));
    let ledger = t.sim().webhook_ledger();
    assert!(ledger.iter().all(SimWebhook::delivered));
    assert_eq!(ledger[0].attempts.len(), 2);
    Ok(())
}

#[tokio::test]
async fn no_answer_in_time_is_retried_so_delivery_is_at_least_once() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t, &["a"]);
    t.sim().set_default_rates(DeliveryRates::none())?;
    let (rx, url) = receiver().await?;
    rx.answer_next([Answer::Hang(Duration::from_millis(800))]);
    let mut config = ReportingWebhook::new(&url, KEY);
    config.timeout = Duration::from_millis(200);
    t.sim().set_reporting_webhook(Some(config))?;
    newsletter(&t)?;
    settled(&t).await?;
    let ledger = t.sim().webhook_ledger();
    assert_eq!(ledger[0].attempts[0].error.as_deref(), Some("timeout"));
    assert!(!ledger[0].delivered());
    // Timeouts retry sooner: 30 s.
    t.sim().advance(Duration::from_secs(31));
    settled(&t).await?;
    let received = rx.received();
    let sent_twice = received
        .iter()
        .filter(|r| r.json()["metric"] == "sent")
        .count();
    assert_eq!(
        sent_twice, 2,
        "the receiver saw the event twice: dedupe on event_id"
    );
    assert!(t.sim().webhook_ledger().iter().all(SimWebhook::delivered));
    Ok(())
}

#[tokio::test]
async fn a_fraction_is_duplicated_right_after() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t, &["a", "b", "c"]);
    t.sim().set_default_rates(DeliveryRates::none())?;
    let (rx, url) = receiver().await?;
    let mut config = ReportingWebhook::new(&url, KEY);
    config.duplicate_rate = 1.0;
    t.sim().set_reporting_webhook(Some(config))?;
    newsletter(&t)?;
    t.sim().advance(Duration::from_secs(120));
    settled(&t).await?;
    let ids: Vec<String> = rx
        .received()
        .iter()
        .filter_map(|r| r.json()["event_id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 12);
    for pair in ids.chunks(2) {
        assert_eq!(pair[0], pair[1]);
    }
    assert!(
        t.sim()
            .webhook_ledger()
            .iter()
            .all(|w| w.copies == 2 && w.delivered())
    );
    Ok(())
}

#[tokio::test]
async fn configured_over_the_control_api() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t, &["a"]);
    t.sim().set_default_rates(DeliveryRates::none())?;
    for bad in [
        json!({"url": "ftp://x", "signing_key": "k"}),
        json!({"url": "http://127.0.0.1:9/h", "signing_key": ""}),
        json!({"url": "http://127.0.0.1:9/h", "signing_key": "k", "duplicate_rate": 2}),
        json!({"url": "http://127.0.0.1:9/h"}),
    ] {
        let status = status_of(t.control(Method::POST, "/_sim/webhooks").json(&bad)).await?;
        assert_eq!(status, 400, "{bad}");
    }
    let (rx, url) = receiver().await?;
    let (status, state) = send(
        t.control(Method::POST, "/_sim/webhooks")
            .json(&json!({"url": url, "signing_key": KEY, "timeout_ms": 1000})),
    )
    .await?;
    assert_eq!(status, 200, "{state}");
    assert_eq!(state["webhook"]["url"], url.as_str());
    assert!(
        state["webhook"].get("signing_key").is_none(),
        "never echoed"
    );
    newsletter(&t)?;
    t.sim().advance(Duration::from_secs(60));
    settled(&t).await?;
    let (_, state) = send(t.control(Method::GET, "/_sim/webhooks")).await?;
    assert_eq!(state["ledger"].as_array().map(Vec::len), Some(2));
    assert_eq!(state["queued"], 0);
    assert_eq!(rx.received().len(), 2);
    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/webhooks")).await?,
        204
    );
    newsletter(&t)?;
    t.sim().advance(Duration::from_secs(60));
    settled(&t).await?;
    assert_eq!(rx.received().len(), 2, "stopped");
    assert!(t.sim().reporting_webhook().is_none());
    Ok(())
}

#[tokio::test]
async fn an_event_failing_for_seven_days_is_abandoned_and_the_next_goes() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    people(&t, &["a"]);
    t.sim().set_default_rates(DeliveryRates::none())?;
    let (rx, url) = receiver().await?;
    rx.answer_next(std::iter::repeat_n(Answer::Status(410), 100));
    t.sim()
        .set_reporting_webhook(Some(ReportingWebhook::new(&url, KEY)))?;
    newsletter(&t)?;
    settled(&t).await?;
    for _ in 0..(8 * 24) {
        t.sim().advance(Duration::from_secs(3600));
        settled(&t).await?;
    }
    let ledger = t.sim().webhook_ledger();
    assert_eq!(ledger[0].metric, "sent");
    assert!(ledger[0].abandoned, "{:?}", ledger[0]);
    let waits: Vec<u64> = ledger[0]
        .attempts
        .windows(2)
        .map(|w| (w[1].since_first_attempt - w[0].since_first_attempt).as_secs() / 3600)
        .collect();
    assert_eq!(
        &waits[..4],
        &[1, 2, 4, 8],
        "exponential from an hour: {waits:?}"
    );
    assert!(!ledger[1].attempts.is_empty(), "the next event is tried");
    Ok(())
}
