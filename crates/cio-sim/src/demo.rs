//! Deterministic demo workspace: a financial newsletter's audience and its segments, plus its
//! campaigns, API-triggered broadcasts and newsletters (ids below; a past newsletter and a past
//! welcome-campaign send give the metrics something to show).
//!
//! | id | kind | name | audience / state |
//! |---|---|---|---|
//! | campaign 1 | event-triggered campaign | Welcome Series | running; sent to 60 readers 2 days before start |
//! | campaign 2 | segment-triggered campaign | Win-back: Dormant Free Readers | running, trigger segment 8 |
//! | broadcast 3 | API-triggered broadcast | Assignment Alert | running, UI audience: segment 4 (High Engagement) |
//! | broadcast 4 | API-triggered broadcast | Breaking Market News | running, UI audience: segment 5 (Premium Subscribers) |
//! | broadcast 5 | API-triggered broadcast | Earnings Season Preview | draft (triggers answer 422) |
//! | newsletter 1 | newsletter | Weekly Market Wrap #41 | segment 5, sent 3 days before start |
//! | newsletter 2 | newsletter | Crypto Special Report | segment 2, draft |
//!
//! A small SplitMix64 generator is used instead of `rand`'s `StdRng` so that the same seed gives
//! the same people across dependency upgrades.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::audience::AudienceFilter;
use crate::sends::{CampaignState, CampaignTrigger, NewBroadcast, NewCampaign, NewsletterSpec};
use crate::state::{Membership, Predicate, World};

/// Deterministic generator (also drives delivery outcomes in `sends`).
pub(crate) struct SplitMix64(pub(crate) u64);

impl SplitMix64 {
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub(crate) fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.unit() * n as f64) as usize % n.max(1)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items
            .get(self.below(items.len()))
            .copied()
            .unwrap_or_default()
    }

    fn weighted<'a>(&mut self, items: &[(&'a str, u32)]) -> &'a str {
        let total: u32 = items.iter().map(|(_, w)| w).sum();
        let mut roll = (self.unit() * f64::from(total)) as u32;
        for (item, weight) in items {
            if roll < *weight {
                return item;
            }
            roll -= weight;
        }
        items.last().map(|(i, _)| *i).unwrap_or_default()
    }
}

const FIRST_NAMES: &[&str] = &[
    "James",
    "Mary",
    "Robert",
    "Patricia",
    "John",
    "Jennifer",
    "Michael",
    "Linda",
    "David",
    "Elizabeth",
    "William",
    "Barbara",
    "Richard",
    "Susan",
    "Joseph",
    "Jessica",
    "Thomas",
    "Sarah",
    "Charles",
    "Karen",
    "Wei",
    "Priya",
    "Hiroshi",
    "Fatima",
    "Lukas",
    "Sofia",
    "Mateo",
    "Aisha",
    "Oliver",
    "Emma",
    "Noah",
    "Amelia",
    "Arjun",
    "Chloe",
    "Liam",
    "Zoe",
];

const LAST_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Garcia",
    "Miller",
    "Davis",
    "Rodriguez",
    "Martinez",
    "Hernandez",
    "Lopez",
    "Wilson",
    "Anderson",
    "Taylor",
    "Thomas",
    "Moore",
    "Martin",
    "Lee",
    "Thompson",
    "White",
    "Harris",
    "Clark",
    "Lewis",
    "Walker",
    "Hall",
    "Young",
    "King",
    "Chen",
    "Patel",
    "Tanaka",
    "Muller",
    "Rossi",
    "Kim",
    "Nguyen",
    "Okafor",
];

const INVESTOR_TYPES: &[(&str, u32)] = &[
    ("growth", 24),
    ("value", 17),
    ("dividend", 14),
    ("income", 9),
    ("crypto", 12),
    ("index", 14),
    ("day_trader", 6),
    ("esg", 4),
];

const COUNTRIES: &[(&str, u32)] = &[
    ("US", 55),
    ("CA", 9),
    ("GB", 10),
    ("AU", 6),
    ("DE", 6),
    ("IN", 5),
    ("SG", 3),
    ("FR", 3),
    ("NL", 3),
];

const INTERESTS: &[&str] = &[
    "stocks",
    "crypto",
    "tech",
    "dividends",
    "real_estate",
    "bonds",
    "commodities",
    "esg",
    "options",
    "macro",
    "etfs",
];

/// 2019-01-01T00:00:00Z and 2026-06-01T00:00:00Z.
const CREATED_FROM: i64 = 1_546_300_800;
const CREATED_TO: i64 = 1_780_272_000;
/// Fixed creation time of the demo segments (2024-01-15T12:00:00Z).
const SEGMENTS_CREATED: i64 = 1_705_320_000;

fn demo_person(rng: &mut SplitMix64, n: usize) -> Map<String, Value> {
    let first = rng.pick(FIRST_NAMES);
    let last = rng.pick(LAST_NAMES);
    let investor_type = rng.weighted(INVESTOR_TYPES);
    let risk = match investor_type {
        "crypto" | "day_trader" => rng.weighted(&[("high", 70), ("medium", 25), ("low", 5)]),
        "growth" => rng.weighted(&[("high", 40), ("medium", 45), ("low", 15)]),
        "dividend" | "income" => rng.weighted(&[("low", 60), ("medium", 35), ("high", 5)]),
        _ => rng.weighted(&[("low", 35), ("medium", 50), ("high", 15)]),
    };
    let tier = rng.weighted(&[("free", 60), ("premium", 28), ("pro", 12)]);
    // Paying readers engage more.
    let base = match tier {
        "pro" => 45.0,
        "premium" => 30.0,
        _ => 0.0,
    };
    let engagement = (base + rng.unit() * (100.0 - base))
        .round()
        .clamp(0.0, 100.0) as i64;

    let mut interests: Vec<&str> = Vec::new();
    let primary = match investor_type {
        "crypto" => Some("crypto"),
        "growth" => Some("tech"),
        "dividend" | "income" => Some("dividends"),
        "index" => Some("etfs"),
        "day_trader" => Some("options"),
        "esg" => Some("esg"),
        "value" => Some("stocks"),
        _ => None,
    };
    interests.extend(primary);
    let extra = 1 + rng.below(3);
    for _ in 0..extra {
        let pick = rng.pick(INTERESTS);
        if !interests.contains(&pick) {
            interests.push(pick);
        }
    }

    // Roughly log-normal portfolio sizes from ~$1k to a few $M, rounded to $100.
    let portfolio = (10f64.powf(3.0 + rng.unit() * 2.2 + rng.unit() * 1.6) / 100.0).round() * 100.0;
    let country = rng.weighted(COUNTRIES);
    let created_at = CREATED_FROM + (rng.unit() * (CREATED_TO - CREATED_FROM) as f64) as i64;

    let mut attrs = Map::new();
    attrs.insert(
        "email".into(),
        json!(format!(
            "{}.{}{n}@example.com",
            first.to_lowercase(),
            last.to_lowercase()
        )),
    );
    attrs.insert("first_name".into(), json!(first));
    attrs.insert("last_name".into(), json!(last));
    attrs.insert("investor_type".into(), json!(investor_type));
    attrs.insert("risk_tolerance".into(), json!(risk));
    attrs.insert("subscription_tier".into(), json!(tier));
    attrs.insert("engagement_score".into(), json!(engagement));
    attrs.insert("interests".into(), json!(interests));
    attrs.insert("portfolio_size_usd".into(), json!(portfolio as i64));
    attrs.insert("country".into(), json!(country));
    attrs.insert("created_at".into(), json!(created_at));
    if rng.chance(0.03) {
        attrs.insert("unsubscribed".into(), json!(true));
    }
    attrs
}

fn eq(field: &str, value: &str) -> Predicate {
    Predicate::Eq(field.to_owned(), Value::String(value.to_owned()))
}

fn contains(field: &str, value: &str) -> Predicate {
    Predicate::Contains(field.to_owned(), value.to_owned())
}

/// Fills `world` with `people` demo people and the demo segments (nothing when `people == 0`).
pub(crate) fn populate(world: &mut World, seed: u64, people: usize) {
    if people == 0 {
        return;
    }
    let mut rng = SplitMix64(seed);
    let width = people.to_string().len().max(5);
    let mut seqs = Vec::with_capacity(people);
    for n in 1..=people {
        let attrs = demo_person(&mut rng, n);
        let created = attrs
            .get("created_at")
            .and_then(Value::as_i64)
            .unwrap_or(CREATED_FROM);
        let id = format!("u{n:0width$}");
        seqs.push((world.upsert_by_id(&id, attrs, created), n));
    }

    let tags = |t: &[&str]| Some(t.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
    let dynamic: Vec<(&str, &str, Predicate, Option<Vec<String>>)> = vec![
        (
            "Growth Investors",
            "Readers who describe themselves as growth investors",
            eq("investor_type", "growth"),
            tags(&["investor-type"]),
        ),
        (
            "Crypto Enthusiasts",
            "Crypto investors and anyone interested in crypto",
            Predicate::Or(vec![
                eq("investor_type", "crypto"),
                contains("interests", "crypto"),
            ]),
            tags(&["investor-type", "crypto"]),
        ),
        (
            "Dividend Seekers",
            "Dividend and income investors",
            Predicate::Or(vec![
                eq("investor_type", "dividend"),
                eq("investor_type", "income"),
            ]),
            tags(&["investor-type"]),
        ),
        (
            "High Engagement",
            "engagement_score >= 80",
            Predicate::Gte("engagement_score".to_owned(), 80.0),
            tags(&["engagement"]),
        ),
        (
            "Premium Subscribers",
            "Paying readers (premium and pro tiers)",
            Predicate::Or(vec![
                eq("subscription_tier", "premium"),
                eq("subscription_tier", "pro"),
            ]),
            tags(&["billing"]),
        ),
        (
            "Conservative Savers",
            "Low risk tolerance, no crypto exposure",
            Predicate::And(vec![
                eq("risk_tolerance", "low"),
                Predicate::Not(Box::new(contains("interests", "crypto"))),
            ]),
            None,
        ),
        (
            "High Net Worth",
            "Portfolio of at least $1M",
            Predicate::Gte("portfolio_size_usd".to_owned(), 1_000_000.0),
            tags(&["billing"]),
        ),
        (
            "Dormant Free Readers",
            "Free tier with engagement_score <= 20",
            Predicate::And(vec![
                eq("subscription_tier", "free"),
                Predicate::Lte("engagement_score".to_owned(), 20.0),
            ]),
            None,
        ),
    ];
    for (name, description, predicate, tags) in dynamic {
        world.add_segment(
            name,
            description,
            Membership::Dynamic(predicate),
            tags,
            SEGMENTS_CREATED,
        );
    }

    // About 6% of readers, biased to the engaged ones.
    let mut vip = BTreeSet::new();
    for (seq, _) in &seqs {
        let engaged = world
            .person(*seq)
            .and_then(|p| p.attributes.get("engagement_score"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
            >= 60;
        if rng.chance(if engaged { 0.11 } else { 0.02 }) {
            vip.insert(*seq);
        }
    }
    world.add_segment(
        "VIP Beta Testers",
        "Hand-picked readers testing new features (manual)",
        Membership::Manual(vip),
        None,
        SEGMENTS_CREATED,
    );
    world.add_segment(
        "Webinar Waitlist",
        "Manual list for the next live webinar (empty)",
        Membership::Manual(BTreeSet::new()),
        None,
        SEGMENTS_CREATED,
    );
    populate_sends(world, width);
}

/// Fixed creation time of the demo campaigns (2025-09-01T09:00:00Z), as internal milliseconds.
const CAMPAIGNS_CREATED_MS: i64 = 1_756_717_200_000;
const HOUR_MS: i64 = 3_600_000;

fn populate_sends(world: &mut World, width: usize) {
    let created = CAMPAIGNS_CREATED_MS + world.sends.age_ms();
    let sends = &mut world.sends;
    let welcome = sends.add_campaign(
        NewCampaign {
            tags: vec!["onboarding".to_owned()],
            subject: "Welcome to SharpSend".to_owned(),
            ..NewCampaign::new("Welcome Series")
        },
        created,
    );
    sends.add_campaign(
        NewCampaign {
            trigger: CampaignTrigger::Segment,
            trigger_segment_ids: vec![8],
            subject: "We miss you: 3 ideas worth your time".to_owned(),
            ..NewCampaign::new("Win-back: Dormant Free Readers")
        },
        created,
    );
    sends.add_broadcast(
        NewBroadcast {
            subject: "New assignment from your analysts".to_owned(),
            tags: vec!["sharpsend".to_owned()],
            ..NewBroadcast::new("Assignment Alert", AudienceFilter::segment(4))
        },
        created,
    );
    sends.add_broadcast(
        NewBroadcast {
            subject: "Breaking: market-moving news".to_owned(),
            ..NewBroadcast::new("Breaking Market News", AudienceFilter::segment(5))
        },
        created,
    );
    sends.add_broadcast(
        NewBroadcast {
            state: CampaignState::Draft,
            ..NewBroadcast::new("Earnings Season Preview", AudienceFilter::segment(1))
        },
        created,
    );
    let wrap = sends.add_newsletter(
        NewsletterSpec {
            name: "Weekly Market Wrap #41".to_owned(),
            subject: "Your weekly market wrap".to_owned(),
            body: "<html><body><h1>Weekly Market Wrap</h1><p>Stocks, rates and what to watch next week.</p></body></html>".to_owned(),
            preheader_text: Some("Stocks, rates and what to watch".to_owned()),
            from: Some("SharpSend Research <research@sharpsend.example>".to_owned()),
            from_id: None,
            recipients: AudienceFilter::segment(5),
            tags: vec!["weekly".to_owned()],
            subscription_topic_id: None,
        },
        created,
    );
    sends.add_newsletter(
        NewsletterSpec {
            name: "Crypto Special Report".to_owned(),
            subject: "Crypto special: what the halving means for you".to_owned(),
            body: "<html><body><h1>Crypto Special Report</h1></body></html>".to_owned(),
            preheader_text: None,
            from: None,
            from_id: Some(1),
            recipients: AudienceFilter::segment(2),
            tags: vec!["crypto".to_owned()],
            subscription_topic_id: None,
        },
        created,
    );
    let now = world.sends.now_ms();
    world.send_newsletter_at(wrap, now - 72 * HOUR_MS);
    let ids: Vec<String> = (1..=60).map(|n| format!("u{n:0width$}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let _ = world.campaign_send_at(welcome, &ids, now - 48 * HOUR_MS);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_is_deterministic_and_segments_are_distinct() {
        let mut a = World::new();
        populate(&mut a, 7, 5000);
        let mut b = World::new();
        populate(&mut b, 7, 5000);
        let counts =
            |w: &World| -> Vec<u64> { w.segment_list().map(|s| w.member_count(s)).collect() };
        let ca = counts(&a);
        assert_eq!(ca, counts(&b));
        assert_eq!(a.people_count(), 5000);
        assert_eq!(ca.len(), 10);
        // Non-empty segments all differ in size and none is everyone.
        let non_empty: Vec<u64> = ca.iter().copied().filter(|c| *c > 0).collect();
        assert_eq!(non_empty.len(), 9, "{ca:?}");
        let distinct: BTreeSet<u64> = non_empty.iter().copied().collect();
        assert_eq!(distinct.len(), non_empty.len(), "{ca:?}");
        assert!(non_empty.iter().all(|c| *c < 4000 && *c >= 50), "{ca:?}");
        // VIP: a few hundred.
        assert!((150..=600).contains(&ca[8]), "{ca:?}");

        let mut c = World::new();
        populate(&mut c, 8, 5000);
        assert_ne!(ca, counts(&c));
    }
}
