//! A delivery's timeline, drawn once when it is created (see the `sends` module docs).

use crate::demo::SplitMix64;

use super::model::{DeliveryMetric, DeliveryRates};

const SECOND: i64 = 1000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;

/// Uniform in `[lo, hi)` milliseconds.
fn between(rng: &mut SplitMix64, lo: i64, hi: i64) -> i64 {
    lo + (rng.unit() * (hi - lo) as f64) as i64
}

/// Exponential with this mean, capped.
fn exponential(rng: &mut SplitMix64, mean: i64, cap: i64) -> i64 {
    let u = rng.unit();
    ((-(1.0 - u).ln() * mean as f64) as i64).clamp(1, cap)
}

/// Draws a delivery's whole timeline. Every draw is made in the same order whatever the
/// outcome, so a delivery's fate depends only on the seed, its sequence number and the rates.
pub(super) fn draw_events(
    seed: u64,
    seq: u64,
    rates: &DeliveryRates,
    sent: i64,
) -> Vec<(DeliveryMetric, i64)> {
    let mut rng =
        SplitMix64(seed ^ 0xD5E1_1BE7_0000_0000 ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut draw = || rng.unit();
    let mut times = SplitMix64(seed.rotate_left(17) ^ seq.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));

    let bounced = draw() < rates.bounce_rate;
    let human_open = draw() < rates.open_rate;
    let machine_open = draw() < rates.machine_open_rate;
    let human_click = draw() < rates.click_rate;
    let machine_click = draw() < rates.machine_click_rate;
    let converted = draw() < rates.conversion_rate;
    let spammed = draw() < rates.spam_rate;
    let unsubscribed = draw() < rates.unsubscribe_rate;

    let bounce_at = sent + between(&mut times, 5 * SECOND, 10 * MINUTE);
    let delivered_at = sent + between(&mut times, 2 * SECOND, MINUTE);
    let machine_open_at = delivered_at + between(&mut times, 30 * SECOND, 30 * MINUTE);
    let human_open_at = delivered_at + exponential(&mut times, 6 * HOUR, 7 * DAY);
    let machine_click_at = delivered_at + between(&mut times, 10 * SECOND, 5 * MINUTE);
    let human_click_at = human_open_at + exponential(&mut times, 20 * MINUTE, 2 * DAY);
    let convert_at = human_click_at + exponential(&mut times, DAY, 7 * DAY);
    let spam_after_open = human_open_at + between(&mut times, MINUTE, 2 * HOUR);
    let spam_unopened = delivered_at + between(&mut times, HOUR, 2 * DAY);
    let unsubscribe_at = human_open_at + between(&mut times, 30 * SECOND, HOUR);

    let mut events = vec![(DeliveryMetric::Sent, sent)];
    if bounced {
        events.push((DeliveryMetric::Bounced, bounce_at));
        return events;
    }
    events.push((DeliveryMetric::Delivered, delivered_at));
    let mut first_open: Option<i64> = None;
    if machine_open {
        events.push((DeliveryMetric::PrefetchOpened, machine_open_at));
        first_open = Some(machine_open_at);
    }
    if human_open {
        events.push((DeliveryMetric::HumanOpened, human_open_at));
        first_open = Some(first_open.map_or(human_open_at, |t| t.min(human_open_at)));
    }
    let mut first_click: Option<i64> = None;
    if machine_click {
        events.push((DeliveryMetric::PrefetchClicked, machine_click_at));
        first_click = Some(machine_click_at);
    }
    let human_clicked = human_open && human_click;
    if human_clicked {
        events.push((DeliveryMetric::HumanClicked, human_click_at));
        first_click = Some(first_click.map_or(human_click_at, |t| t.min(human_click_at)));
    }
    // A link cannot be clicked unopened: a click before any open counts as the open too
    // (Customer.io's "synthetic" open).
    let opened_at = match (first_open, first_click) {
        (Some(open), Some(click)) => Some(open.min(click)),
        (open, click) => open.or(click),
    };
    if let Some(at) = opened_at {
        events.push((DeliveryMetric::Opened, at));
    }
    if let Some(at) = first_click {
        events.push((DeliveryMetric::Clicked, at));
    }
    if human_clicked && converted {
        events.push((DeliveryMetric::Converted, convert_at));
    }
    if spammed {
        let at = if human_open {
            spam_after_open
        } else {
            spam_unopened
        };
        events.push((DeliveryMetric::Spammed, at));
    }
    if human_open && unsubscribed {
        events.push((DeliveryMetric::Unsubscribed, unsubscribe_at));
    }
    events.sort_by_key(|(metric, at)| (*at, *metric));
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_reproducible_and_follow_rates() {
        let rates = DeliveryRates::default();
        let a: Vec<_> = (0..200).map(|i| draw_events(7, i, &rates, 0)).collect();
        let b: Vec<_> = (0..200).map(|i| draw_events(7, i, &rates, 0)).collect();
        let c: Vec<_> = (0..200).map(|i| draw_events(8, i, &rates, 0)).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        for events in &a {
            let has = |m| events.iter().any(|(x, _)| *x == m);
            assert!(has(DeliveryMetric::Sent));
            assert_ne!(has(DeliveryMetric::Delivered), has(DeliveryMetric::Bounced));
            assert_eq!(
                has(DeliveryMetric::Opened),
                has(DeliveryMetric::HumanOpened)
                    || has(DeliveryMetric::PrefetchOpened)
                    || has(DeliveryMetric::Clicked)
            );
            if has(DeliveryMetric::HumanClicked) {
                assert!(has(DeliveryMetric::HumanOpened));
            }
            if has(DeliveryMetric::Converted) {
                assert!(has(DeliveryMetric::HumanClicked));
            }
            assert!(
                events.windows(2).all(|w| w[0].1 <= w[1].1),
                "sorted by time"
            );
        }
        let all: Vec<_> = draw_events(1, 1, &DeliveryRates::all(), 0)
            .into_iter()
            .map(|(m, _)| m)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let expected: Vec<_> = DeliveryMetric::ALL
            .into_iter()
            .filter(|m| *m != DeliveryMetric::Bounced)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(all, expected);
        let none = draw_events(1, 1, &DeliveryRates::none(), 0);
        assert_eq!(none.len(), 2, "{none:?}");
    }
}
