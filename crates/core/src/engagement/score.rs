//! The `engagement-scoring` job: per person, from the delivery events attributed to SharpSend
//! sends, the attributes that go back onto Customer.io profiles:
//!
//! | attribute | value |
//! |---|---|
//! | `assignment_open_rate` | deliveries opened by a person ÷ deliveries delivered (4 decimals) |
//! | `assignment_click_rate` | deliveries clicked by a person ÷ deliveries delivered (4 decimals) |
//! | `sharpsend_assignment_interactions` | deliveries opened or clicked by a person |
//! | `last_assignment_interaction` | unix seconds of the last human open or click (absent: none) |
//! | `preferred_content_types` | up to 3 content types of the assignments they clicked, most clicked first (ties by name) |
//! | `sharpsend_engagement_score` | 0–100, [`engagement_score`] |
//!
//! Prefetched opens and machine clicks never count. Only attributes whose value differs from
//! the profile mirror are written, through the ordinary attribute-write path
//! ([`crate::profiles::update_attributes`]: mirror + outbox in one transaction, managed
//! segments reading them marked due), one write per page of people. People are read a page
//! at a time in `customer_id` order, so memory does not grow with the number of events.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::{Map, Value, json};
use sharpsend_db::engagement::{self as store, DeliveryFacts};

use crate::profiles::{self, AttributeUpdate};
use crate::{AppContext, CoreError};

/// People per page.
const PAGE_PEOPLE: u64 = 500;
/// Half-life of a delivery's weight in the score, in days.
pub const HALF_LIFE_DAYS: f64 = 30.0;
/// The score's prior: this many unengaged deliveries' worth of doubt (so that one click is not
/// a perfect score).
pub const PRIOR_DELIVERIES: f64 = 1.0;
/// What an opened-but-not-clicked delivery is worth next to a clicked one.
pub const OPEN_WEIGHT: f64 = 0.5;
/// How many content types `preferred_content_types` holds at most.
pub const PREFERRED_TYPES: usize = 3;

/// The attributes written.
pub const ATTRIBUTES: [&str; 6] = [
    "assignment_open_rate",
    "assignment_click_rate",
    "sharpsend_assignment_interactions",
    "last_assignment_interaction",
    "preferred_content_types",
    "sharpsend_engagement_score",
];

/// One delivered delivery, for [`engagement_score`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Delivered {
    /// Days since the delivery (its first event), ≥ 0.
    pub age_days: f64,
    pub human_open: bool,
    pub human_click: bool,
}

/// The engagement score, 0–100:
///
/// ```text
/// w(d)  = 0.5 ^ (age_days(d) / 30)                      recency weight, halves every 30 days
/// e(d)  = 1 if clicked by a person, 0.5 if only opened by a person, else 0
/// score = round(100 × Σ w(d)·e(d) / (Σ w(d) + 1))
/// ```
///
/// over the person's delivered SharpSend deliveries. The `+ 1` is a prior of one unengaged
/// delivery: one click scores 50, four recent clicks 80, and old engagement fades as new
/// deliveries go unread — and, with no new deliveries at all, slowly as the weights shrink
/// next to the prior.
pub fn engagement_score(deliveries: &[Delivered]) -> u8 {
    let (mut weighted, mut weights) = (0.0_f64, 0.0_f64);
    for d in deliveries {
        let w = 0.5_f64.powf(d.age_days.max(0.0) / HALF_LIFE_DAYS);
        let e = if d.human_click {
            1.0
        } else if d.human_open {
            OPEN_WEIGHT
        } else {
            0.0
        };
        weighted += w * e;
        weights += w;
    }
    let score = (100.0 * weighted / (weights + PRIOR_DELIVERIES)).round();
    score.clamp(0.0, 100.0) as u8
}

fn rate(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        return 0.0;
    }
    (part as f64 / whole as f64 * 10_000.0).round() / 10_000.0
}

/// The attributes of one person from their deliveries (one person's [`DeliveryFacts`]);
/// `content_types` by send id; `now` in unix seconds.
pub fn attributes_of(
    facts: &[&DeliveryFacts],
    content_types: &HashMap<i64, Vec<String>>,
    now: i64,
) -> Map<String, Value> {
    let delivered: Vec<&&DeliveryFacts> = facts.iter().filter(|f| f.delivered).collect();
    let opened = delivered.iter().filter(|f| f.human_open).count();
    let clicked = delivered.iter().filter(|f| f.human_click).count();
    let interactions = facts
        .iter()
        .filter(|f| f.human_open || f.human_click)
        .count();
    let last = facts.iter().filter_map(|f| f.last_interaction_at).max();
    let mut clicks_by_type: BTreeMap<&str, usize> = BTreeMap::new();
    for f in facts.iter().filter(|f| f.human_click) {
        for kind in content_types.get(&f.send_id).into_iter().flatten() {
            *clicks_by_type.entry(kind.as_str()).or_default() += 1;
        }
    }
    let mut preferred: Vec<(&str, usize)> = clicks_by_type.into_iter().collect();
    preferred.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let preferred: Vec<&str> = preferred
        .into_iter()
        .take(PREFERRED_TYPES)
        .map(|(k, _)| k)
        .collect();
    let scored: Vec<Delivered> = delivered
        .iter()
        .map(|f| Delivered {
            age_days: (now - f.first_at).max(0) as f64 / 86_400.0,
            human_open: f.human_open,
            human_click: f.human_click,
        })
        .collect();
    let mut out = Map::new();
    out.insert(
        "assignment_open_rate".into(),
        json!(rate(opened, delivered.len())),
    );
    out.insert(
        "assignment_click_rate".into(),
        json!(rate(clicked, delivered.len())),
    );
    out.insert(
        "sharpsend_assignment_interactions".into(),
        json!(interactions),
    );
    if let Some(last) = last {
        out.insert("last_assignment_interaction".into(), json!(last));
    }
    out.insert("preferred_content_types".into(), json!(preferred));
    out.insert(
        "sharpsend_engagement_score".into(),
        json!(engagement_score(&scored)),
    );
    out
}

/// What one scoring run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ScoringReport {
    /// People with attributed deliveries.
    pub people: u64,
    /// People whose attributes changed (written to the mirror and the outbox).
    pub changed: u64,
    /// Events attributed to a send only now.
    pub attributed_late: u64,
}

/// Runs the scoring over every person with attributed deliveries.
pub async fn score(ctx: &AppContext) -> Result<ScoringReport, CoreError> {
    let ws = ctx.workspace_id();
    let mut report = ScoringReport {
        attributed_late: store::attribute_pending(&ctx.db, ws).await?,
        ..ScoringReport::default()
    };
    let now = ctx.now().timestamp();
    let mut content_types: HashMap<i64, Vec<String>> = HashMap::new();
    let mut after = String::new();
    loop {
        let facts = store::delivery_facts(&ctx.db, ws, &after, PAGE_PEOPLE).await?;
        let Some(last) = facts.last() else { break };
        after = last.customer_id.clone();
        let unknown: Vec<i64> = facts
            .iter()
            .map(|f| f.send_id)
            .filter(|id| !content_types.contains_key(id))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !unknown.is_empty() {
            for (id, request) in store::send_requests(&ctx.db, &unknown).await? {
                let kinds = request
                    .get("content_types")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                content_types.insert(id, kinds);
            }
        }
        let mut by_person: BTreeMap<&str, Vec<&DeliveryFacts>> = BTreeMap::new();
        for f in &facts {
            by_person.entry(f.customer_id.as_str()).or_default().push(f);
        }
        let ids: Vec<&str> = by_person.keys().copied().collect();
        let mirrored = store::profile_attributes(&ctx.db, ws, &ids).await?;
        let mut updates = Vec::new();
        for (person, facts) in &by_person {
            report.people += 1;
            let computed = attributes_of(facts, &content_types, now);
            let current = mirrored.get(*person);
            let changed: Map<String, Value> = computed
                .into_iter()
                .filter(|(k, v)| current.and_then(|c| c.get(k)) != Some(v))
                .collect();
            if changed.is_empty() {
                continue;
            }
            let mut problems = Vec::new();
            profiles::check_customer_id(&mut problems, "customer_id", person);
            if !problems.is_empty() {
                tracing::warn!(customer_id = %person, "engagement scores not written: the customer id cannot be written to Customer.io");
                continue;
            }
            report.changed += 1;
            updates.push(AttributeUpdate {
                customer_id: (*person).to_string(),
                attributes: changed,
            });
        }
        if !updates.is_empty() {
            profiles::update_attributes(ctx, updates, Some("engagement_scores")).await?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(age_days: f64, open: bool, click: bool) -> Delivered {
        Delivered {
            age_days,
            human_open: open,
            human_click: click,
        }
    }

    #[test]
    fn the_score_follows_the_documented_formula() {
        assert_eq!(engagement_score(&[]), 0);
        // One click: 100 × 1 / (1 + 1).
        assert_eq!(engagement_score(&[d(0.0, true, true)]), 50);
        // Four recent clicks: 100 × 4 / 5.
        assert_eq!(engagement_score(&[d(0.0, true, true); 4]), 80);
        // Opens are worth half a click: 100 × 0.5 / 2.
        assert_eq!(engagement_score(&[d(0.0, true, false)]), 25);
        // Unread deliveries pull it down: 100 × 4 / (8 + 1).
        let mut mixed = vec![d(0.0, true, true); 4];
        mixed.extend([d(0.0, false, false); 4]);
        assert_eq!(engagement_score(&mixed), 44);
        // A 30-day-old click weighs half: 100 × 0.5 / (0.5 + 1).
        assert_eq!(engagement_score(&[d(30.0, true, true)]), 33);
        // Recent engagement outweighs old silence.
        let recent_click = [d(0.0, true, true), d(60.0, false, false)];
        let old_click = [d(60.0, true, true), d(0.0, false, false)];
        assert!(engagement_score(&recent_click) > engagement_score(&old_click));
        // Bounded.
        assert!(engagement_score(&[d(0.0, true, true); 10_000]) <= 100);
        assert_eq!(
            engagement_score(&[d(-5.0, true, true)]),
            50,
            "future ages count as now"
        );
    }

    fn facts(delivery: &str, send_id: i64, open: bool, click: bool, at: i64) -> DeliveryFacts {
        DeliveryFacts {
            customer_id: "p1".into(),
            delivery_id: delivery.into(),
            send_id,
            delivered: true,
            human_open: open,
            human_click: click,
            bounced: false,
            unsubscribed: false,
            first_at: at,
            last_interaction_at: (open || click).then_some(at + 60),
        }
    }

    #[test]
    fn attributes_count_per_delivery_and_rank_content_types() {
        let now = 1_700_000_000;
        let all = [
            facts("d1", 1, true, true, now),
            facts("d2", 2, true, true, now - 100),
            facts("d3", 3, true, false, now - 200),
            facts("d4", 3, false, false, now - 300),
        ];
        let refs: Vec<&DeliveryFacts> = all.iter().collect();
        let kinds = HashMap::from([
            (1, vec!["growth".to_string(), "crypto".to_string()]),
            (2, vec!["growth".to_string()]),
            (3, vec!["dividends".to_string()]),
        ]);
        let a = attributes_of(&refs, &kinds, now);
        assert_eq!(a["assignment_open_rate"], json!(0.75));
        assert_eq!(a["assignment_click_rate"], json!(0.5));
        assert_eq!(a["sharpsend_assignment_interactions"], json!(3));
        assert_eq!(a["last_assignment_interaction"], json!(now + 60));
        assert_eq!(a["preferred_content_types"], json!(["growth", "crypto"]));
        // 100 × (1 + 1 + 0.5) / (4 + 1), ages of seconds.
        assert_eq!(a["sharpsend_engagement_score"], json!(50));
    }
}
