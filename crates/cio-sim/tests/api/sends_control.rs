//! The `/_sim/` control routes for sends: broadcasts, triggers, deliveries, advance, rates.

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{demo_unlimited, send, spawn, status_of};
use cio_sim::DeliveryFilter;

#[tokio::test]
async fn broadcasts_triggers_deliveries_and_advance_over_http() -> anyhow::Result<()> {
    let t = spawn(demo_unlimited()).await?;
    let (status, body) = send(t.control(Method::GET, "/_sim/campaigns")).await?;
    assert_eq!(status, 200);
    assert_eq!(body["campaigns"].as_array().map(Vec::len), Some(5));
    let (_, body) = send(t.control(Method::GET, "/_sim/newsletters")).await?;
    assert_eq!(body["newsletters"].as_array().map(Vec::len), Some(2));
    assert!(body["newsletters"][0]["recipients_count"].as_u64() > Some(0));

    let (status, created) = send(t.control(Method::POST, "/_sim/broadcasts").json(&json!({
        "name": "Growth alert",
        "recipients": {"segment": {"id": 1}},
        "subject": "Growth pick",
        "tags": ["x"]
    })))
    .await?;
    assert_eq!(status, 201, "{created}");
    let id = created["broadcast"]["id"].as_i64().unwrap_or(0);
    assert_eq!(id, 6);
    assert_eq!(created["broadcast"]["kind"], "broadcast");
    assert_eq!(created["broadcast"]["state"], "running");
    assert_eq!(
        created["broadcast"]["audience"],
        json!({"segment": {"id": 1}})
    );
    for bad in [
        json!({"name": "x", "recipients": {}}),
        json!({"name": "x", "recipients": {"segment": {"id": 999}}}),
        json!({"name": "x"}),
    ] {
        assert_eq!(
            status_of(t.control(Method::POST, "/_sim/broadcasts").json(&bad)).await?,
            400,
            "{bad}"
        );
    }
    let (_, list) = send(t.control(Method::GET, "/_sim/broadcasts")).await?;
    assert_eq!(list["broadcasts"].as_array().map(Vec::len), Some(4));

    // Rates over HTTP, then a trigger through the App API.
    let (status, rates) = send(t.control(Method::POST, "/_sim/rates").json(&json!({
        "key": {"subject": "Growth pick"},
        "rates": {"bounce_rate": 0.0, "open_rate": 1.0}
    })))
    .await?;
    assert_eq!(status, 200, "{rates}");
    assert_eq!(rates["rules"][0]["key"], json!({"subject": "Growth pick"}));
    assert_eq!(rates["rules"][0]["rates"]["open_rate"], 1.0);
    assert_eq!(
        rates["rules"][0]["rates"]["click_rate"], 0.12,
        "unset rates are the defaults"
    );
    assert_eq!(
        status_of(
            t.control(Method::POST, "/_sim/rates")
                .json(&json!({"rates": {"open_rate": -1}}))
        )
        .await?,
        400
    );
    let (status, answer) = send(
        t.app(Method::POST, &format!("/v1/campaigns/{id}/triggers"))
            .json(&json!({})),
    )
    .await?;
    assert_eq!(status, 200, "{answer}");
    let trigger = answer["id"].as_i64().unwrap_or(0);
    let (_, triggers) =
        send(t.control(Method::GET, &format!("/_sim/triggers?broadcast_id={id}"))).await?;
    assert_eq!(triggers["triggers"][0]["id"], trigger);
    let recipients = triggers["triggers"][0]["recipients_count"]
        .as_u64()
        .unwrap_or(0);
    assert!(recipients > 100);

    let (_, deliveries) = send(t.control(
        Method::GET,
        &format!("/_sim/deliveries?trigger_id={trigger}&limit=2"),
    ))
    .await?;
    assert_eq!(deliveries["count"], recipients);
    assert_eq!(deliveries["deliveries"].as_array().map(Vec::len), Some(2));
    assert_eq!(deliveries["totals"]["sent"], recipients);
    assert_eq!(
        deliveries["totals"]["human_opened"], 0,
        "nothing opened yet"
    );
    assert_eq!(deliveries["eventual_totals"]["human_opened"], recipients);
    assert_eq!(deliveries["deliveries"][0]["subject"], "Growth pick");

    let (status, advanced) = send(
        t.control(Method::POST, "/_sim/advance")
            .json(&json!({"seconds": 8 * 24 * 3600})),
    )
    .await?;
    assert_eq!(status, 200);
    assert_eq!(advanced["advanced_ms"], 8 * 24 * 3600 * 1000_u64);
    assert_eq!(
        status_of(
            t.control(Method::POST, "/_sim/advance")
                .json(&json!({"seconds": 1, "ms": 1}))
        )
        .await?,
        400
    );
    let (_, after) = send(t.control(
        Method::GET,
        &format!("/_sim/deliveries?trigger_id={trigger}&limit=0"),
    ))
    .await?;
    assert_eq!(after["totals"]["human_opened"], recipients);
    assert_eq!(after["deliveries"], json!([]));
    assert_eq!(
        t.sim()
            .delivery_totals(&DeliveryFilter::trigger(trigger))
            .human_opened,
        recipients
    );

    assert_eq!(
        status_of(t.control(Method::DELETE, "/_sim/rates")).await?,
        204
    );
    let (_, rates) = send(t.control(Method::GET, "/_sim/rates")).await?;
    assert_eq!(rates["rules"], json!([]));
    assert!(rates["default"]["open_rate"].as_f64().is_some());

    // The trigger interval is a rate limit.
    let (_, limits) = send(
        t.control(Method::POST, "/_sim/rate-limits")
            .json(&json!({"trigger_interval_ms": 0})),
    )
    .await?;
    assert_eq!(limits["trigger_interval_ms"], 0);
    for _ in 0..2 {
        let (status, _) = send(
            t.app(Method::POST, &format!("/v1/campaigns/{id}/triggers"))
                .json(&json!({"ids": ["u00001"]})),
        )
        .await?;
        assert_eq!(status, 200);
    }
    let _: Value = limits;
    Ok(())
}
