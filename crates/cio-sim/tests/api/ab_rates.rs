//! Content-dependent true rates: variants marked in the subject, the content or the name get
//! known click rates; the ledger counts per rule.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::helpers::{TestSim, empty_unlimited, send, spawn};
use cio_sim::{AudienceFilter, DeliveryRates, NewBroadcast, NewNewsletter, RatesKey};

fn audience(t: &TestSim, n: usize) {
    for i in 0..n {
        let attrs = json!({"email": format!("ab{i}@example.com")});
        t.sim().upsert_person(
            &format!("ab{i:05}"),
            attrs.as_object().cloned().unwrap_or_default(),
        );
    }
}

fn variant_rates(click_through: f64) -> DeliveryRates {
    DeliveryRates {
        bounce_rate: 0.0,
        open_rate: 0.5,
        machine_open_rate: 0.0,
        machine_click_rate: 0.0,
        ..DeliveryRates::none()
    }
    .with_click_through(click_through)
}

#[tokio::test]
async fn three_variants_get_their_known_click_rates() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let sim = t.sim();
    audience(&t, 3000);
    let truth = [("[A]", 0.05), ("[B]", 0.10), ("[C]", 0.20)];
    for (marker, ctr) in truth {
        sim.set_rates(RatesKey::SubjectContains(marker.into()), variant_rates(ctr))?;
    }
    for (marker, _) in truth {
        let newsletter = sim.add_newsletter(NewNewsletter::new(
            &format!("Spring sale {marker}"),
            &format!("Spring sale {marker}: 20% off"),
            "<p>sale</p>",
            AudienceFilter::attribute_exists("email"),
        ))?;
        sim.send_newsletter(newsletter)?;
    }
    sim.advance(Duration::from_secs(10 * 24 * 3600));
    let lines = sim.totals_by_rates_rule();
    assert_eq!(lines[0].key, None);
    assert_eq!(lines[0].deliveries, 0, "every delivery matched a variant");
    for (marker, ctr) in truth {
        let line = lines
            .iter()
            .find(|l| l.key == Some(RatesKey::SubjectContains(marker.into())))
            .ok_or_else(|| anyhow::anyhow!("no line for {marker}"))?;
        assert_eq!(line.deliveries, 3000);
        let measured = line.totals.human_clicked as f64 / line.totals.delivered as f64;
        assert!(
            (measured - ctr).abs() < 0.02,
            "{marker}: measured {measured}, true {ctr}"
        );
        let opens = line.totals.human_opened as f64 / line.totals.delivered as f64;
        assert!((opens - 0.5).abs() < 0.04, "{marker}: opens {opens}");
        assert_eq!(line.totals, line.eventual, "everything has happened");
    }
    Ok(())
}

#[tokio::test]
async fn content_and_name_markers_and_the_control_api() -> anyhow::Result<()> {
    let t = spawn(empty_unlimited()).await?;
    let sim = t.sim();
    audience(&t, 20);
    // Over the control API.
    let (status, state) = send(t.control(Method::POST, "/_sim/rates").json(&json!({
        "key": {"content_contains": "hero-v2"},
        "rates": {"bounce_rate": 0.0, "open_rate": 1.0, "click_rate": 1.0}
    })))
    .await?;
    assert_eq!(status, 200, "{state}");
    sim.set_rates(
        RatesKey::NameContains("Digest".into()),
        DeliveryRates {
            bounce_rate: 1.0,
            ..DeliveryRates::none()
        },
    )?;
    let broadcast = sim.add_broadcast(NewBroadcast::new(
        "Hero test",
        AudienceFilter::attribute_exists("email"),
    ))?;
    let (status, _) = send(
        t.app(Method::POST, &format!("/v1/campaigns/{broadcast}/triggers"))
            .json(&json!({"data": {"hero": "hero-v2", "headline": "New"}})),
    )
    .await?;
    assert_eq!(status, 200);
    let digest = sim.add_newsletter(NewNewsletter::new(
        "Weekly Digest",
        "This week",
        "<p>hero-v2 is not in the name</p>",
        AudienceFilter::attribute_exists("email"),
    ))?;
    sim.send_newsletter(digest)?;
    sim.advance(Duration::from_secs(10 * 24 * 3600));

    let (_, state) = send(t.control(Method::GET, "/_sim/rates")).await?;
    let ledger = state["ledger"].as_array().cloned().unwrap_or_default();
    let line = |key: serde_json::Value| {
        ledger
            .iter()
            .find(|l| l["key"] == key)
            .cloned()
            .unwrap_or_default()
    };
    let hero = line(json!({"content_contains": "hero-v2"}));
    assert_eq!(hero["deliveries"], 20);
    assert_eq!(hero["totals"]["human_clicked"], 20);
    // The newsletter's body holds the content marker too, but the name rule was set later:
    // the most recent matching rule wins.
    let named = line(json!({"name_contains": "Digest"}));
    assert_eq!(named["deliveries"], 20);
    assert_eq!(named["totals"]["bounced"], 20);
    Ok(())
}
