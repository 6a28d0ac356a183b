//! Broadcast triggers, newsletters and metrics against the simulator: sends are never retried,
//! a lost answer is reported as outcome-unknown, and metric totals match the delivery ledger.

use std::time::Duration;

use cio_client::{
    CioClient, CioError, MetricsOf, MetricsQuery, NewNewsletter, Recipients, Resolution, Trigger,
};
use cio_sim::{DeliveryFilter, Fault, SimApi};
use serde_json::{Map, json};

use crate::helpers::{client, config, requests_to, spawn_sim};

fn data(marker: &str) -> Map<String, serde_json::Value> {
    json!({ "sharpsend_send": marker })
        .as_object()
        .cloned()
        .unwrap_or_default()
}

fn alert_broadcast(running: &cio_sim::RunningSim) -> i64 {
    running
        .sim
        .broadcasts()
        .into_iter()
        .find(|b| b.name == "Assignment Alert")
        .map(|b| b.id)
        .unwrap()
}

#[tokio::test]
async fn a_trigger_reaches_the_segment_and_its_status_and_list_agree() {
    let running = spawn_sim().await;
    let client = client(&running);
    let broadcast = alert_broadcast(&running);
    let segment = running
        .sim
        .segments()
        .into_iter()
        .find(|s| s.name == "Growth Investors")
        .unwrap();
    let trigger = Trigger {
        recipients: Recipients::Filter(json!({"segment": {"id": segment.id}})),
        data: data("s-1"),
    };
    let id = client.trigger_broadcast(broadcast, &trigger).await.unwrap();

    let recorded = running.sim.trigger(id).unwrap();
    assert_eq!(recorded.broadcast_id, broadcast);
    assert!(recorded.recipients_count > 0 && recorded.recipients_count <= segment.member_count);
    let status = client.trigger_status(broadcast, id).await.unwrap();
    assert_eq!(status.id, id);
    assert_eq!(
        status.recipients_count,
        Some(recorded.recipients_count as i64)
    );
    let listed = client.broadcast_triggers(broadcast).await.unwrap();
    assert!(listed.iter().any(|t| t.id == id));
}

#[tokio::test]
async fn a_second_trigger_within_the_window_is_refused_and_never_retried() {
    let running = spawn_sim().await;
    let client = client(&running);
    let broadcast = alert_broadcast(&running);
    let trigger = Trigger {
        recipients: Recipients::Default,
        data: data("s-2"),
    };
    client.trigger_broadcast(broadcast, &trigger).await.unwrap();
    let err = client
        .trigger_broadcast(broadcast, &trigger)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CioError::RateLimited {
                retry_after: Some(_),
                ..
            }
        ),
        "{err:?}"
    );
    let posts = requests_to(&running, "/v1/campaigns/")
        .into_iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 2, "the refused trigger was retried");
    assert_eq!(running.sim.triggers(Some(broadcast)).len(), 1);
}

#[tokio::test]
async fn a_lost_answer_is_outcome_unknown_and_the_trigger_happened_once() {
    let running = spawn_sim().await;
    let client = client(&running);
    let broadcast = alert_broadcast(&running);
    running
        .sim
        .push_faults(Some(SimApi::App), [Fault::AcceptThenDrop]);
    let err = client
        .trigger_broadcast(
            broadcast,
            &Trigger {
                recipients: Recipients::Default,
                data: data("s-3"),
            },
        )
        .await
        .unwrap_err();
    assert!(err.is_outcome_unknown(), "{err:?}");
    assert_eq!(
        running.sim.triggers(Some(broadcast)).len(),
        1,
        "sent twice or not at all"
    );
    // Reconciliation can find it.
    let listed = client.broadcast_triggers(broadcast).await.unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn a_newsletter_is_created_sent_and_its_metrics_match_the_ledger() {
    let running = spawn_sim().await;
    let mut cfg = config(&running);
    cfg.timeout = Duration::from_secs(5);
    let client = CioClient::new(cfg).unwrap();
    let segment = running
        .sim
        .segments()
        .into_iter()
        .find(|s| s.name == "Crypto Enthusiasts")
        .unwrap();
    let mut newsletter = NewNewsletter::email(
        "sharpsend send s-4",
        json!({"segment": {"id": segment.id}}),
        "Q4 Crypto Outlook",
        "<p>Hello</p>",
    );
    newsletter.from = Some("research@example.com".into());
    let created = client.create_newsletter(&newsletter).await.unwrap();
    assert!(
        client
            .list_newsletters()
            .await
            .unwrap()
            .iter()
            .any(|n| n.id == created.id && n.name == "sharpsend send s-4")
    );
    client.send_newsletter(created.id).await.unwrap();
    let send = format!("/v1/newsletters/{}/send", created.id);
    let logged = requests_to(&running, &send);
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].method, "POST");
    assert_eq!(
        logged[0].body,
        Some(json!({})),
        "the send's body is the JSON `{{}}`"
    );
    running.sim.advance(Duration::from_secs(3 * 86_400));

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let series = client
        .metrics(
            MetricsOf::Newsletter(created.id),
            MetricsQuery {
                res: Resolution::Days,
                start: now - 10 * 86_400,
                end: now,
            },
        )
        .await
        .unwrap();
    let totals = series.totals();
    let ledger = running
        .sim
        .delivery_totals(&DeliveryFilter::newsletter(created.id));
    assert!(ledger.sent > 0);
    assert_eq!(totals.get("sent").copied(), Some(ledger.sent));
    assert_eq!(totals.get("delivered").copied(), Some(ledger.delivered));
    assert_eq!(totals.get("opened").copied(), Some(ledger.opened));
    assert_eq!(totals.get("clicked").copied(), Some(ledger.clicked));
    // Sending it again is refused, not repeated.
    let again = client.send_newsletter(created.id).await.unwrap_err();
    assert!(
        matches!(again, CioError::Rejected { status: 400, .. }),
        "{again:?}"
    );
}

#[tokio::test]
async fn newsletters_are_listed_across_pages_and_newest_first_on_request() {
    let running = spawn_sim().await;
    let client = client(&running);
    let before = running.sim.newsletters().len();
    for i in 0..230 {
        let new = cio_sim::NewNewsletter::new(
            &format!("bulk {i}"),
            "s",
            "<p>b</p>",
            cio_sim::AudienceFilter::segment(1),
        );
        running.sim.add_newsletter(new).unwrap();
    }
    let all = client.list_newsletters().await.unwrap();
    assert_eq!(all.len(), before + 230, "every page followed");
    assert!(all.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    let pages = requests_to(&running, "/v1/newsletters")
        .into_iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(pages, 3, "pages of {}", cio_client::NEWSLETTERS_PAGE);

    let newest = client.newsletters_page(None, 5, true).await.unwrap();
    assert_eq!(newest.items.len(), 5);
    assert_eq!(newest.items[0].name, "bulk 229");
    assert!(newest.next.as_deref().is_some_and(|n| !n.is_empty()));
    let second = client
        .newsletters_page(newest.next.as_deref(), 5, true)
        .await
        .unwrap();
    assert_eq!(second.items[0].name, "bulk 224");
}

#[tokio::test]
async fn metrics_are_bucketed_in_the_configured_time_zone() {
    let running = spawn_sim().await;
    let newsletter = MetricsOf::Newsletter(running.sim.newsletters()[0].id);
    // 2026-01-01 10:00 to 20:00 UTC: one day in New York (05:00 to 15:00) and in UTC, two in
    // Tokyo (19:00 to 05:00 the next day).
    let query = MetricsQuery {
        res: Resolution::Days,
        start: 1_767_261_600,
        end: 1_767_297_600,
    };
    let days = |series: cio_client::MetricSeries| series.series["sent"].len();

    let default = client(&running);
    assert_eq!(default.metrics_tz(), "America/New_York");
    assert_eq!(days(default.metrics(newsletter, query).await.unwrap()), 1);
    assert_eq!(
        days(default.metrics_in(newsletter, query, "UTC").await.unwrap()),
        1
    );
    assert_eq!(
        days(
            default
                .metrics_in(newsletter, query, "Asia/Tokyo")
                .await
                .unwrap()
        ),
        2
    );
    let mut cfg = config(&running);
    cfg.metrics_tz = "Asia/Tokyo".into();
    let tokyo = CioClient::new(cfg).unwrap();
    assert_eq!(days(tokyo.metrics(newsletter, query).await.unwrap()), 2);

    let sent_tz: Vec<String> = requests_to(&running, "/v1/newsletters/")
        .into_iter()
        .map(|r| {
            let query = r.query.unwrap_or_default();
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("tz="))
                .unwrap_or("(none)")
                .to_owned()
        })
        .collect();
    assert_eq!(
        sent_tz,
        ["America%2FNew_York", "UTC", "Asia%2FTokyo", "Asia%2FTokyo"]
    );

    let err = default
        .metrics_in(newsletter, query, "Mars/Olympus")
        .await
        .unwrap_err();
    assert!(matches!(err, CioError::Config { .. }), "{err:?}");
    assert_eq!(
        requests_to(&running, "/v1/newsletters/").len(),
        4,
        "nothing sent"
    );
}

#[tokio::test]
async fn a_trigger_with_missing_ids_has_paged_errors() {
    let running = spawn_sim().await;
    let client = client(&running);
    let broadcast = alert_broadcast(&running);
    let mut ids: Vec<String> = vec!["u00001".into()];
    ids.extend((0..5).map(|i| format!("nobody-{i}")));
    let err = client
        .trigger_broadcast(
            broadcast,
            &Trigger {
                recipients: Recipients::Ids(ids),
                data: data("s-errors"),
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, CioError::Rejected { status: 422, .. }),
        "{err:?}"
    );
    // Recorded with its errors, nothing sent; the newest trigger of the broadcast.
    let trigger = client.broadcast_triggers(broadcast).await.unwrap()[0].id;
    assert_eq!(running.sim.trigger(trigger).unwrap().recipients_count, 0);

    let first = client
        .trigger_errors_page(broadcast, trigger, None, 2)
        .await
        .unwrap();
    assert_eq!(first.items.len(), 2);
    assert!(first.items[0].starts_with("line 2:"), "{:?}", first.items);
    assert!(first.items[0].contains("nobody-0"), "{:?}", first.items);
    let second = client
        .trigger_errors_page(broadcast, trigger, first.next.as_deref(), 2)
        .await
        .unwrap();
    assert!(second.items[0].contains("nobody-2"), "{:?}", second.items);

    let all = client.trigger_errors(broadcast, trigger).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(
        all.iter().all(|line| line.contains("does not exist")),
        "{all:?}"
    );
    assert_eq!(
        all[..2],
        first.items[..],
        "pages are consecutive slices of the list"
    );

    // A clean trigger has none; an unknown one is not found.
    running.sim.set_trigger_interval(Duration::ZERO);
    let clean = client
        .trigger_broadcast(
            broadcast,
            &Trigger {
                recipients: Recipients::Ids(vec!["u00001".into()]),
                data: data("s-clean"),
            },
        )
        .await
        .unwrap();
    assert!(
        client
            .trigger_errors(broadcast, clean)
            .await
            .unwrap()
            .is_empty()
    );
    let missing = client
        .trigger_errors(broadcast, clean + 1000)
        .await
        .unwrap_err();
    assert!(matches!(missing, CioError::NotFound { .. }), "{missing:?}");
}

#[tokio::test]
async fn with_the_subscription_center_on_a_newsletter_needs_a_topic() {
    let running = spawn_sim().await;
    let client = client(&running);
    let segment = running.sim.segments()[0].id;
    let before = running.sim.newsletters().len();
    let mut new = NewNewsletter::email(
        "sharpsend send s-topic",
        json!({"segment": {"id": segment}}),
        "Subject",
        "<p>Body</p>",
    );
    // Off (the default): no topic needed, none sent.
    let plain = client.create_newsletter(&new).await.unwrap();
    let logged = requests_to(&running, "/v1/newsletters");
    assert!(
        logged[0]
            .body
            .as_ref()
            .unwrap()
            .get("subscription_topic_id")
            .is_none()
    );

    running.sim.set_subscription_center(true);
    let err = client.create_newsletter(&new).await.unwrap_err();
    assert!(
        matches!(err, CioError::Rejected { status: 400, .. }),
        "{err:?}"
    );
    assert_eq!(
        err.details()[0].message,
        "subscription_topic_id is required"
    );
    assert_eq!(
        running.sim.newsletters().len(),
        before + 1,
        "nothing created"
    );

    new.subscription_topic_id = Some(2);
    let created = client.create_newsletter(&new).await.unwrap();
    assert!(created.id > plain.id);
    assert_eq!(running.sim.newsletters().len(), before + 2);
    let logged = requests_to(&running, "/v1/newsletters");
    assert_eq!(
        logged.last().unwrap().body.as_ref().unwrap()["subscription_topic_id"],
        2
    );
}
