//! A delivery's timeline, drawn once when it is created (see the `sends` module docs), and the
//! per-person behaviour behind it ([`Engagement`]).
//!
//! Each person has a seeded engagement (a standard normal latent `z`) and two fixed traits:
//! whether their mail client prefetches (Apple Mail Privacy Protection) and whether their mail
//! goes through a link scanner. Each delivery draws an eagerness `u = 1 − Φ(√ρ·z + √(1−ρ)·ε)`
//! with fresh noise `ε` (uniform over people): a human open when `u < open_rate`, a human click
//! when `u < open_rate · click_rate` (so a click implies an open and P(click | open) is the
//! click rate). The configured rates hold exactly over a population while the same people open
//! and click again and again (ρ, the engagement correlation; 0 = independent deliveries). Machine opens happen to every
//! delivery of a prefetching person, machine clicks to every delivery of a scanned one; which
//! people those are follows `machine_open_rate` / `machine_click_rate` (a person is
//! prefetching when their trait is below the rate).

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

/// Standard normal CDF (Abramowitz & Stegun 7.1.26 on erf; absolute error below 1e-7).
pub(crate) fn normal_cdf(x: f64) -> f64 {
    let t = 1.0 / (1.0 + 0.327_591_1 * x.abs() / std::f64::consts::SQRT_2);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-(x * x) / 2.0).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// Inverse standard normal CDF (Acklam's rational approximation; relative error ~1e-9).
pub(crate) fn normal_quantile(p: f64) -> f64 {
    const A: [f64; 6] = [
        -3.969_683_028_665_376e1,
        2.209_460_984_245_205e2,
        -2.759_285_104_469_687e2,
        1.383_577_518_672_69e2,
        -3.066_479_806_614_716e1,
        2.506_628_277_459_239,
    ];
    const B: [f64; 5] = [
        -5.447_609_879_822_406e1,
        1.615_858_368_580_409e2,
        -1.556_989_798_598_866e2,
        6.680_131_188_771_972e1,
        -1.328_068_155_288_572e1,
    ];
    const C: [f64; 6] = [
        -7.784_894_002_430_293e-3,
        -3.223_964_580_411_365e-1,
        -2.400_758_277_161_838,
        -2.549_732_539_343_734,
        4.374_664_141_464_968,
        2.938_163_982_698_783,
    ];
    const D: [f64; 4] = [
        7.784_695_709_041_462e-3,
        3.224_671_290_700_398e-1,
        2.445_134_137_142_996,
        3.754_408_661_907_416,
    ];
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    let tail = |q: f64| {
        (((((C[0] * q + C[1]) * q + C[2]) * q + C[3]) * q + C[4]) * q + C[5])
            / ((((D[0] * q + D[1]) * q + D[2]) * q + D[3]) * q + 1.0)
    };
    if p < 0.024_25 {
        tail((-2.0 * p.ln()).sqrt())
    } else if p > 1.0 - 0.024_25 {
        -tail((-2.0 * (1.0 - p).ln()).sqrt())
    } else {
        let q = p - 0.5;
        let r = q * q;
        (((((A[0] * r + A[1]) * r + A[2]) * r + A[3]) * r + A[4]) * r + A[5]) * q
            / (((((B[0] * r + B[1]) * r + B[2]) * r + B[3]) * r + B[4]) * r + 1.0)
    }
}

/// One person's behaviour towards email (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Engagement {
    /// Engagement latent, standard normal: high opens and clicks more.
    pub(crate) latent: f64,
    /// Uniform trait: the mail client prefetches when below `machine_open_rate`.
    pub(crate) prefetch: f64,
    /// Uniform trait: a link scanner clicks when below `machine_click_rate`.
    pub(crate) scanner: f64,
    /// The engagement correlation ρ in `0..=1`.
    pub(crate) correlation: f64,
}

impl Engagement {
    /// The person with this sequence number, in the workspace with this seed.
    pub(crate) fn of(seed: u64, person_seq: u64, correlation: f64) -> Self {
        let mut rng = SplitMix64(
            seed.rotate_left(7)
                ^ 0x9E11_A6E0_0000_0001
                ^ person_seq.wrapping_mul(0xA24B_AED4_963E_E407),
        );
        Self {
            latent: normal_quantile(rng.unit()),
            prefetch: rng.unit(),
            scanner: rng.unit(),
            correlation: correlation.clamp(0.0, 1.0),
        }
    }

    /// A uniform draw for one delivery, given fresh noise `u`, pulled low by the person's
    /// engagement: a behaviour of probability `p` happens when it is below `p` (uniform over
    /// people, so the rate holds; the higher the latent, the likelier).
    fn eagerness(&self, u: f64) -> f64 {
        let rho = self.correlation;
        let noise = normal_quantile(u);
        1.0 - normal_cdf(rho.sqrt() * self.latent + (1.0 - rho).sqrt() * noise)
    }

    /// The person's engagement as a percentile of the population (0..1).
    pub(crate) fn percentile(&self) -> f64 {
        normal_cdf(self.latent)
    }
}

/// Draws a delivery's whole timeline. Every draw is made in the same order whatever the
/// outcome, so a delivery's fate depends only on the seed, its sequence number, the rates and
/// the recipient's [`Engagement`].
pub(super) fn draw_events(
    seed: u64,
    seq: u64,
    rates: &DeliveryRates,
    sent: i64,
    person: &Engagement,
) -> Vec<(DeliveryMetric, i64)> {
    let mut rng =
        SplitMix64(seed ^ 0xD5E1_1BE7_0000_0000 ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut draw = || rng.unit();
    let mut times = SplitMix64(seed.rotate_left(17) ^ seq.wrapping_mul(0xC2B2_AE3D_27D4_EB4F));

    let bounced = draw() < rates.bounce_rate;
    // One eagerness for opening and clicking: the eagerest openers click, so a click implies
    // an open and P(click | open) is exactly the click rate.
    let eagerness = person.eagerness(draw());
    let human_open = eagerness < rates.open_rate;
    let _ = draw();
    let machine_open = person.prefetch < rates.machine_open_rate;
    let human_click = eagerness < rates.open_rate * rates.click_rate;
    let _ = draw();
    let machine_click = person.scanner < rates.machine_click_rate;
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
        let person = |seed, i| Engagement::of(seed, i, 0.5);
        let a: Vec<_> = (0..200)
            .map(|i| draw_events(7, i, &rates, 0, &person(7, i)))
            .collect();
        let b: Vec<_> = (0..200)
            .map(|i| draw_events(7, i, &rates, 0, &person(7, i)))
            .collect();
        let c: Vec<_> = (0..200)
            .map(|i| draw_events(8, i, &rates, 0, &person(8, i)))
            .collect();
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
        let all: Vec<_> = draw_events(1, 1, &DeliveryRates::all(), 0, &Engagement::of(1, 1, 0.9))
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
        let none = draw_events(1, 1, &DeliveryRates::none(), 0, &Engagement::of(1, 1, 0.9));
        assert_eq!(none.len(), 2, "{none:?}");
    }

    #[test]
    fn normal_functions_invert_each_other() {
        for p in [0.001, 0.02, 0.1, 0.3, 0.5, 0.77, 0.975, 0.999] {
            let x = normal_quantile(p);
            assert!((normal_cdf(x) - p).abs() < 1e-6, "{p} -> {x}");
        }
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
    }

    /// Over many people the configured rates hold; the same people open again and again, the
    /// more so the higher the correlation.
    #[test]
    fn rates_hold_over_people_and_engaged_people_repeat() {
        let rates = DeliveryRates {
            open_rate: 0.3,
            click_rate: 0.5,
            ..DeliveryRates::none()
        };
        let people = 4000_u64;
        let opens_of = |rho: f64, round: u64| -> Vec<bool> {
            (0..people)
                .map(|p| {
                    let seq = round * people + p;
                    draw_events(3, seq, &rates, 0, &Engagement::of(3, p, rho))
                        .iter()
                        .any(|(m, _)| *m == DeliveryMetric::HumanOpened)
                })
                .collect()
        };
        for rho in [0.0, 0.8] {
            let first = opens_of(rho, 0);
            let second = opens_of(rho, 1);
            let rate = first.iter().filter(|o| **o).count() as f64 / people as f64;
            assert!((rate - 0.3).abs() < 0.03, "rho {rho}: open rate {rate}");
            let both = first
                .iter()
                .zip(&second)
                .filter(|(a, b)| **a && **b)
                .count() as f64;
            let repeat = both / first.iter().filter(|o| **o).count() as f64;
            if rho == 0.0 {
                assert!((repeat - 0.3).abs() < 0.05, "independent: {repeat}");
            } else {
                assert!(repeat > 0.6, "openers open again: {repeat}");
            }
        }
        // Prefetching is a trait: a prefetching person's every delivery is machine-opened.
        let machine = DeliveryRates {
            machine_open_rate: 0.25,
            ..DeliveryRates::none()
        };
        let prefetching = (0..people)
            .filter(|p| {
                let person = Engagement::of(3, *p, 0.5);
                let once = |seq| {
                    draw_events(3, seq, &machine, 0, &person)
                        .iter()
                        .any(|(m, _)| *m == DeliveryMetric::PrefetchOpened)
                };
                let (a, b) = (once(*p), once(*p + people));
                assert_eq!(a, b);
                a
            })
            .count() as f64;
        assert!((prefetching / people as f64 - 0.25).abs() < 0.03);
    }
}
