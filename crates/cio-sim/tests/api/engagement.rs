//! Per-person engagement: the same people open and click again and again, machine opens and
//! clicks belong to people (prefetching clients, link scanners), the rates still hold.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::{empty_unlimited, send, spawn};
use cio_sim::{AudienceFilter, DeliveryFilter, DeliveryMetric, DeliveryRates, NewNewsletter};

#[tokio::test]
async fn engaged_people_engage_repeatedly_and_machines_are_people() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let sim = t.sim();
    let people: Vec<String> = (0..400).map(|i| format!("e{i:03}")).collect();
    for id in &people {
        let attrs = json!({"email": format!("{id}@example.com")});
        sim.upsert_person(id, attrs.as_object().cloned().unwrap_or_default());
    }
    sim.set_default_rates(DeliveryRates {
        open_rate: 0.3,
        click_rate: 0.4,
        machine_open_rate: 0.2,
        machine_click_rate: 0.05,
        ..DeliveryRates::none()
    })?;
    let rounds = 6;
    for round in 0..rounds {
        let newsletter = sim.add_newsletter(NewNewsletter::new(
            &format!("Issue {round}"),
            &format!("Issue {round}"),
            "<p>x</p>",
            AudienceFilter::attribute_exists("email"),
        ))?;
        sim.send_newsletter(newsletter)?;
    }
    sim.advance(Duration::from_secs(10 * 24 * 3600));

    let opens_of = |id: &str| -> usize {
        let filter = DeliveryFilter {
            person_id: Some(id.to_owned()),
            ..DeliveryFilter::all()
        };
        sim.deliveries(&filter)
            .iter()
            .filter(|d| d.events.contains_key(&DeliveryMetric::HumanOpened))
            .count()
    };
    let mut by_engagement: Vec<(f64, usize)> = people
        .iter()
        .map(|id| {
            let e = sim.engagement(id).map_or(0.0, |e| e.percentile);
            (e, opens_of(id))
        })
        .collect();
    by_engagement.sort_by(|a, b| a.0.total_cmp(&b.0));
    let quarter = people.len() / 4;
    let low: usize = by_engagement[..quarter].iter().map(|(_, o)| o).sum();
    let high: usize = by_engagement[people.len() - quarter..]
        .iter()
        .map(|(_, o)| o)
        .sum();
    assert!(
        high > 4 * low.max(1),
        "the most engaged quarter opens far more: {high} vs {low}"
    );
    // The rate still holds over the audience.
    let totals = sim.delivery_totals(&DeliveryFilter::all());
    let rate = totals.human_opened as f64 / totals.delivered as f64;
    assert!((rate - 0.3).abs() < 0.05, "open rate {rate}");
    // Prefetching clients open every message by machine; scanned mail is clicked every time.
    for id in &people {
        let Some(e) = sim.engagement(id) else {
            continue;
        };
        let filter = DeliveryFilter {
            person_id: Some(id.clone()),
            ..DeliveryFilter::all()
        };
        for d in sim.deliveries(&filter) {
            assert_eq!(
                d.events.contains_key(&DeliveryMetric::PrefetchOpened),
                e.prefetches,
                "{id}"
            );
            assert_eq!(
                d.events.contains_key(&DeliveryMetric::PrefetchClicked),
                e.link_scanned,
                "{id}"
            );
        }
    }

    // Over the control API.
    let (status, body) = send(t.control(Method::GET, "/_sim/engagement?person=e001")).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["engagement"]["percentile"].is_f64());
    let (status, body) = send(
        t.control(Method::POST, "/_sim/engagement")
            .json(&json!({"correlation": 0.0})),
    )
    .await?;
    assert_eq!((status, body["correlation"].as_f64()), (200, Some(0.0)));
    let (status, _) = send(
        t.control(Method::POST, "/_sim/engagement")
            .json(&json!({"correlation": 2.0})),
    )
    .await?;
    assert_eq!(status, 400);
    Ok(())
}
