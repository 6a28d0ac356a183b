//! Deliveries as messages against the simulator: attribution by polling, and one person's
//! history.

use std::time::Duration;

use cio_client::{CioError, IdType, MessagesOf, MessagesQuery};
use cio_sim::{AudienceFilter, DeliveryFilter, DeliveryRates, NewNewsletter};
use futures::TryStreamExt as _;
use serde_json::json;

use crate::helpers::{client, spawn_empty_sim};

#[tokio::test]
async fn polling_a_newsletter_sees_opens_as_they_happen() {
    let sim = spawn_empty_sim().await;
    for i in 0..30 {
        let attrs = json!({"email": format!("r{i}@example.com")});
        sim.upsert_person(&format!("r{i:02}"), attrs.as_object().cloned().unwrap());
    }
    sim.set_default_rates(DeliveryRates {
        open_rate: 0.5,
        click_rate: 0.5,
        ..DeliveryRates::none()
    })
    .unwrap();
    let newsletter = sim
        .add_newsletter(NewNewsletter::new(
            "Weekly",
            "Hello",
            "<p>x</p>",
            AudienceFilter::attribute_exists("email"),
        ))
        .unwrap();
    sim.send_newsletter(newsletter).unwrap();
    let client = client(&sim);
    let of = MessagesOf::Newsletter(newsletter);

    let all: Vec<_> = client
        .messages(of, MessagesQuery::new().with_limit(7))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(all.len(), 30);
    assert!(all.iter().all(|m| m.metric("opened").is_none()));
    assert!(all.iter().all(|m| m.newsletter_id == Some(newsletter)));

    sim.advance(Duration::from_secs(8 * 24 * 3600));
    let opened: Vec<_> = client
        .messages(of, MessagesQuery::new().with_metric("opened"))
        .try_collect()
        .await
        .unwrap();
    let ledger = sim.delivery_totals(&DeliveryFilter::newsletter(newsletter));
    assert_eq!(opened.len() as u64, ledger.opened);
    assert!(ledger.opened > 0);
    let clicks = opened
        .iter()
        .filter(|m| m.metric("clicked").is_some())
        .count();
    assert_eq!(clicks as u64, ledger.clicked);

    // The per-kind wrappers hit the same route; a newsletter id is not a campaign.
    let page = client
        .newsletter_messages_page(newsletter, &MessagesQuery::new().with_limit(1), None)
        .await
        .unwrap();
    assert_eq!(page.items.len(), 1);
    assert!(page.next.is_some());
    let wrong = client
        .campaign_messages_page(newsletter, &MessagesQuery::new(), None)
        .await
        .unwrap_err();
    assert!(matches!(wrong, CioError::NotFound { .. }), "{wrong:?}");
    let bad = client
        .broadcast_messages_page(1, &MessagesQuery::new().with_limit(0), None)
        .await
        .unwrap_err();
    assert!(matches!(bad, CioError::Config { .. }));

    // One person's history.
    let mine: Vec<_> = client
        .customer_messages("r0@example.com", IdType::Email, 10)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].customer_id.as_deref(), Some("r00"));
    assert_eq!(mine[0].recipient.as_deref(), Some("r0@example.com"));
    let ghost = client
        .customer_messages_page("ghost", IdType::Id, 10, None)
        .await
        .unwrap_err();
    assert!(matches!(ghost, CioError::NotFound { .. }));
}
