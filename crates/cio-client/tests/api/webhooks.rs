//! Receiving the simulator's reporting webhooks with the client's helpers: every request
//! verifies and parses; a wrong key does not; duplicates are recognisable by event id.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use cio_client::webhooks::{DEFAULT_TOLERANCE, SIGNATURE_HEADER, TIMESTAMP_HEADER};
use cio_client::{
    Metric, ObjectType, ReportingEvent, WebhookError, parse_reporting_event, verify_signature,
};
use cio_sim::{AudienceFilter, DeliveryRates, NewNewsletter, ReportingWebhook};
use serde_json::json;
use tokio::net::TcpListener;

use crate::helpers::spawn_empty_sim;

const KEY: &str = "whsec-client-test";

#[derive(Clone, Default)]
struct Inbox {
    accepted: Arc<Mutex<Vec<ReportingEvent>>>,
    refused: Arc<Mutex<Vec<WebhookError>>>,
    key: Arc<Mutex<String>>,
}

async fn receive(State(inbox): State<Inbox>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let key = inbox.key.lock().unwrap().clone();
    let verified = verify_signature(
        &key,
        &header(TIMESTAMP_HEADER),
        &header(SIGNATURE_HEADER),
        &body,
        SystemTime::now(),
        DEFAULT_TOLERANCE,
    );
    if let Err(e) = verified {
        inbox.refused.lock().unwrap().push(e);
        return StatusCode::UNAUTHORIZED;
    }
    match parse_reporting_event(&body) {
        Ok(event) => inbox.accepted.lock().unwrap().push(event),
        // Signed but not understood: accept it anyway so nothing is held back.
        Err(e) => inbox.refused.lock().unwrap().push(e),
    }
    StatusCode::NO_CONTENT
}

async fn inbox(key: &str) -> (Inbox, String) {
    let inbox = Inbox::default();
    *inbox.key.lock().unwrap() = key.to_owned();
    let app = Router::new()
        .route("/cio", post(receive))
        .with_state(inbox.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/cio", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (inbox, url)
}

#[tokio::test]
async fn the_simulators_webhooks_verify_and_parse() {
    let sim = spawn_empty_sim().await;
    for i in 0..4 {
        let attrs = json!({"email": format!("w{i}@example.com")});
        sim.upsert_person(&format!("w{i}"), attrs.as_object().cloned().unwrap());
    }
    let (inbox, url) = inbox(KEY).await;
    let mut config = ReportingWebhook::new(&url, KEY);
    config.duplicate_rate = 0.5;
    sim.set_reporting_webhook(Some(config)).unwrap();
    sim.set_default_rates(DeliveryRates {
        bounce_rate: 0.0,
        ..DeliveryRates::all()
    })
    .unwrap();
    let newsletter = sim
        .add_newsletter(NewNewsletter::new(
            "Weekly",
            "Hi",
            "<p>x</p>",
            AudienceFilter::attribute_exists("email"),
        ))
        .unwrap();
    sim.send_newsletter(newsletter).unwrap();
    sim.advance(Duration::from_secs(10 * 24 * 3600));
    assert!(sim.webhooks_settled(Duration::from_secs(10)).await);

    let accepted = inbox.accepted.lock().unwrap().clone();
    assert!(inbox.refused.lock().unwrap().is_empty());
    let ledger = sim.webhook_ledger();
    let copies: usize = ledger.iter().map(|w| usize::from(w.copies)).sum();
    assert_eq!(accepted.len(), copies);
    assert!(copies > ledger.len(), "some were duplicated");
    let unique: HashSet<&str> = accepted.iter().map(|e| e.event_id.as_str()).collect();
    assert_eq!(
        unique.len(),
        ledger.len(),
        "deduplicating on event_id leaves one each"
    );
    for event in &accepted {
        assert_eq!(event.object_type, ObjectType::Email);
        assert!(
            !matches!(event.metric, Metric::Other(_)),
            "{:?}",
            event.metric
        );
        assert_eq!(event.data.newsletter_id, Some(newsletter));
        assert!(event.data.delivery_id.is_some() && event.data.content_id.is_some());
        assert!(event.timestamp.is_some());
        assert!(
            event.data.other.is_empty(),
            "every field is known: {:?}",
            event.data.other
        );
    }
    let machine_opens = accepted
        .iter()
        .filter(|e| e.metric == Metric::Opened && e.is_machine())
        .count();
    let machine_clicks = accepted
        .iter()
        .filter(|e| e.metric == Metric::Clicked && e.data.machine == Some(true))
        .count();
    assert!(machine_opens >= 4 && machine_clicks >= 4);
}

#[tokio::test]
async fn a_receiver_with_the_wrong_key_refuses_and_holds_everything_back() {
    let sim = spawn_empty_sim().await;
    let attrs = json!({"email": "x@example.com"});
    sim.upsert_person("x", attrs.as_object().cloned().unwrap());
    let (inbox, url) = inbox("not-the-key").await;
    sim.set_reporting_webhook(Some(ReportingWebhook::new(&url, KEY)))
        .unwrap();
    sim.set_default_rates(DeliveryRates::none()).unwrap();
    let newsletter = sim
        .add_newsletter(NewNewsletter::new(
            "N",
            "S",
            "<p>x</p>",
            AudienceFilter::attribute_exists("email"),
        ))
        .unwrap();
    sim.send_newsletter(newsletter).unwrap();
    sim.advance(Duration::from_secs(120));
    assert!(sim.webhooks_settled(Duration::from_secs(10)).await);
    assert_eq!(
        *inbox.refused.lock().unwrap(),
        vec![WebhookError::SignatureMismatch]
    );
    let ledger = sim.webhook_ledger();
    assert_eq!(ledger[0].attempts[0].status, Some(401));
    assert!(
        ledger[1].attempts.is_empty(),
        "held back behind the refused one"
    );
}
