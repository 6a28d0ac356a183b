//! The statistics of an A/B test: rates with intervals, a sequential decision that stays valid
//! however often it is looked at, and the sample a test needs.
//!
//! **Method.** Every pair of variants is compared on the difference of their rates with a
//! mixture sequential probability ratio test (mSPRT; Johari, Pekelis & Walsh, "Always valid
//! inference", 2017), using the normal approximation of the difference. With `θ̂ = p̂ᵢ − p̂ⱼ`, its
//! variance `V = p̃ᵢ(1−p̃ᵢ)/nᵢ + p̃ⱼ(1−p̃ⱼ)/nⱼ` (rates smoothed by half a success so an arm with no
//! success yet has a variance) and a normal mixing distribution of the true difference with
//! standard deviation `τ`, the likelihood ratio is
//!
//! ```text
//! Λ = sqrt(V / (V + τ²)) · exp(θ̂² τ² / (2 V (V + τ²)))
//! ```
//!
//! Under "no difference", the chance that `Λ` *ever* reaches `1/α` is at most `α` (Ville's
//! inequality), so `p = min over looks of 1/Λ` is an always-valid p-value: looking every few
//! minutes does not inflate false winners. Multiplicity across variants is controlled with
//! Bonferroni over the `k(k−1)/2` pairs. A variant wins when, for every other variant, the pair's
//! always-valid p-value is below `α / pairs` and the winner's rate was the higher one when the
//! pair crossed. `τ` is the minimum detectable effect (absolute), which puts the test's
//! sensitivity where the planner said it matters.
//!
//! **Assumptions.** Recipients respond independently; the normal approximation holds once each
//! arm has its minimum sample (a decision setting, never below [`MIN_SAMPLE_FLOOR`]); rates are
//! measured on recipients (a late click still counts for its recipient), so every arm is judged
//! on the same clock. The calibration tests below check the error rates under the job's looking
//! schedule.

/// No decision is taken on fewer recipients per variant than this, whatever the test says.
pub const MIN_SAMPLE_FLOOR: u64 = 100;

/// Successes among recipients of one variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Arm {
    pub recipients: u64,
    pub successes: u64,
}

impl Arm {
    pub fn new(recipients: u64, successes: u64) -> Self {
        Arm {
            recipients,
            successes: successes.min(recipients),
        }
    }

    /// The observed rate; 0 with no recipients.
    pub fn rate(&self) -> f64 {
        if self.recipients == 0 {
            0.0
        } else {
            self.successes as f64 / self.recipients as f64
        }
    }

    /// The rate smoothed by half a success, so that its variance is never zero.
    fn smoothed_rate(&self) -> f64 {
        (self.successes as f64 + 0.5) / (self.recipients as f64 + 1.0)
    }

    /// The Wilson score interval of the rate at `confidence` (e.g. 0.95); `(0, 1)` with no
    /// recipients.
    pub fn interval(&self, confidence: f64) -> (f64, f64) {
        if self.recipients == 0 {
            return (0.0, 1.0);
        }
        let n = self.recipients as f64;
        let p = self.rate();
        let z = normal_quantile(0.5 + confidence / 2.0);
        let z2 = z * z;
        let denominator = 1.0 + z2 / n;
        let centre = (p + z2 / (2.0 * n)) / denominator;
        let half = z / denominator * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
        ((centre - half).max(0.0), (centre + half).min(1.0))
    }
}

/// What the sequential rule needs to know.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecisionRule {
    /// The family-wise false-winner rate, e.g. 0.05 for 95% confidence.
    pub alpha: f64,
    /// The standard deviation of the mixing distribution of true differences (absolute rate);
    /// the minimum detectable effect.
    pub tau: f64,
    /// Recipients every variant must have before any pair is judged.
    pub min_sample: u64,
}

impl DecisionRule {
    fn min_sample(&self) -> u64 {
        self.min_sample.max(MIN_SAMPLE_FLOOR)
    }
}

/// The likelihood ratio of "the rates differ" against "they are equal" for one pair.
pub fn mixture_likelihood_ratio(a: Arm, b: Arm, tau: f64) -> f64 {
    if a.recipients == 0 || b.recipients == 0 || tau <= 0.0 {
        return 1.0;
    }
    let (pa, pb) = (a.smoothed_rate(), b.smoothed_rate());
    let v = pa * (1.0 - pa) / a.recipients as f64 + pb * (1.0 - pb) / b.recipients as f64;
    let t2 = tau * tau;
    let diff = a.rate() - b.rate();
    let log_ratio = 0.5 * (v / (v + t2)).ln() + diff * diff * t2 / (2.0 * v * (v + t2));
    log_ratio.exp()
}

/// The running state of one test: per pair, the smallest always-valid p-value seen so far and
/// which side was ahead when it was seen. Stored with the test so every look continues it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SequentialState {
    variants: usize,
    /// Indexed by [`pair_index`]; starts at 1.
    min_p: Vec<f64>,
    /// For each pair `(i, j)`, `i < j`: whether `i` was ahead at the pair's smallest p-value.
    first_ahead: Vec<bool>,
}

/// The index of pair `(i, j)`, `i < j`, among the `k(k−1)/2` pairs of `k` variants.
fn pair_index(k: usize, i: usize, j: usize) -> usize {
    debug_assert!(i < j && j < k);
    i * (2 * k - i - 1) / 2 + (j - i - 1)
}

/// The outcome of one look.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Variant `index` beat every other variant; `p_value` is the largest of its pairs'
    /// always-valid p-values (already compared with `alpha / pairs`).
    Winner { index: usize, p_value: f64 },
    /// Not enough recipients yet in some variant.
    NeedsSample,
    /// No variant has beaten all others yet.
    Continue,
}

impl SequentialState {
    pub fn new(variants: usize) -> Self {
        let pairs = variants * variants.saturating_sub(1) / 2;
        SequentialState {
            variants,
            min_p: vec![1.0; pairs],
            first_ahead: vec![false; pairs],
        }
    }

    pub fn pairs(&self) -> usize {
        self.min_p.len()
    }

    /// How many variants it compares.
    pub fn variants(&self) -> usize {
        self.variants
    }

    /// The always-valid p-value of variant `i` against `j` so far (before multiplicity
    /// correction), and whether `i` was the one ahead.
    pub fn pair(&self, i: usize, j: usize) -> (f64, bool) {
        match i.cmp(&j) {
            std::cmp::Ordering::Less => {
                let at = pair_index(self.variants, i, j);
                (self.min_p[at], self.first_ahead[at])
            }
            std::cmp::Ordering::Greater => {
                let at = pair_index(self.variants, j, i);
                (self.min_p[at], !self.first_ahead[at])
            }
            std::cmp::Ordering::Equal => (1.0, false),
        }
    }

    /// Takes one look at the arms (one per variant, in variant order) and says what it shows.
    pub fn observe(&mut self, arms: &[Arm], rule: &DecisionRule) -> Verdict {
        debug_assert_eq!(arms.len(), self.variants);
        if arms.len() != self.variants || arms.iter().any(|a| a.recipients < rule.min_sample()) {
            return Verdict::NeedsSample;
        }
        let k = self.variants;
        for i in 0..k {
            for j in i + 1..k {
                let at = pair_index(k, i, j);
                let ratio = mixture_likelihood_ratio(arms[i], arms[j], rule.tau);
                let p = (1.0 / ratio).min(1.0);
                if p < self.min_p[at] {
                    self.min_p[at] = p;
                    self.first_ahead[at] = arms[i].rate() > arms[j].rate();
                }
            }
        }
        let threshold = rule.alpha / self.pairs().max(1) as f64;
        (0..k)
            .find_map(|i| {
                let mut worst = 0.0_f64;
                for j in (0..k).filter(|&j| j != i) {
                    let (p, ahead) = self.pair(i, j);
                    if !(ahead && p <= threshold) {
                        return None;
                    }
                    worst = worst.max(p);
                }
                Some(Verdict::Winner {
                    index: i,
                    p_value: worst,
                })
            })
            .unwrap_or(Verdict::Continue)
    }
}

/// What a planned test needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    /// Recipients per variant for the sequential rule to reach `power` by its last look.
    pub per_variant: u64,
    /// What a single fixed-horizon look would need (for comparison; always smaller).
    pub fixed_horizon_per_variant: u64,
}

/// Why a plan cannot be made.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("baseline_rate must be between 0 and 1 (exclusive)")]
    Baseline,
    #[error("minimum_detectable_effect must be positive and keep the rate below 1")]
    Effect,
    #[error("power must be between 0.5 and 1 (exclusive)")]
    Power,
    #[error("confidence must be between 0.5 and 1 (exclusive)")]
    Confidence,
    #[error("variants must be between 2 and 8")]
    Variants,
    #[error("the effect is too small to detect with fewer than 100,000,000 recipients per variant")]
    TooSmall,
}

/// The sample per variant a test of `variants` variants needs to find an absolute lift of
/// `effect` over `baseline` with `power` at `confidence`, judged by the sequential rule of this
/// module (with `τ = effect`, Bonferroni over all pairs). Conservative: it counts only the last
/// look; earlier looks can only add power.
pub fn plan(
    baseline: f64,
    effect: f64,
    power: f64,
    confidence: f64,
    variants: usize,
) -> Result<Plan, PlanError> {
    if !(baseline > 0.0 && baseline < 1.0) {
        return Err(PlanError::Baseline);
    }
    if !(effect > 0.0 && baseline + effect < 1.0) {
        return Err(PlanError::Effect);
    }
    if !(power > 0.5 && power < 1.0) {
        return Err(PlanError::Power);
    }
    if !(confidence > 0.5 && confidence < 1.0) {
        return Err(PlanError::Confidence);
    }
    if !(2..=8).contains(&variants) {
        return Err(PlanError::Variants);
    }
    let (p1, p2) = (baseline, baseline + effect);
    let spread = p1 * (1.0 - p1) + p2 * (1.0 - p2);
    let pairs = (variants * (variants - 1) / 2) as f64;
    let alpha = (1.0 - confidence) / pairs;
    let tau2 = effect * effect;

    let sequential_power = |n: f64| {
        let v = spread / n;
        let threshold =
            ((v + tau2) / tau2 * (2.0 * (1.0 / alpha).ln() + ((v + tau2) / v).ln())).sqrt();
        let shift = effect / v.sqrt();
        normal_cdf(shift - threshold) + normal_cdf(-shift - threshold)
    };
    let per_variant = smallest_n(|n| sequential_power(n) >= power)?;

    let z_alpha = normal_quantile(1.0 - alpha / 2.0);
    let z_beta = normal_quantile(power);
    let pooled = (p1 + p2) / 2.0;
    let root = z_alpha * (2.0 * pooled * (1.0 - pooled)).sqrt() + z_beta * spread.sqrt();
    let fixed = (root * root / (effect * effect)).ceil();
    Ok(Plan {
        per_variant,
        fixed_horizon_per_variant: fixed as u64,
    })
}

/// The smallest `n` (≥ [`MIN_SAMPLE_FLOOR`]) for which `enough(n)`, by doubling then bisection.
fn smallest_n(enough: impl Fn(f64) -> bool) -> Result<u64, PlanError> {
    const LIMIT: u64 = 100_000_000;
    let mut high = MIN_SAMPLE_FLOOR;
    while !enough(high as f64) {
        high *= 2;
        if high > LIMIT {
            return Err(PlanError::TooSmall);
        }
    }
    let mut low = high / 2;
    if high == MIN_SAMPLE_FLOOR {
        return Ok(high);
    }
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if enough(mid as f64) {
            high = mid
        } else {
            low = mid
        }
    }
    Ok(high)
}

/// The standard normal distribution function, from the complementary error function
/// (Chebyshev fit, fractional error below 1.2e-7 everywhere).
pub fn normal_cdf(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let value = t * poly.exp();
    if x >= 0.0 { value } else { 2.0 - value }
}

/// The inverse of [`normal_cdf`] by bisection (to 1e-9); `p` outside (0, 1) is clamped.
pub fn normal_quantile(p: f64) -> f64 {
    let p = p.clamp(1e-15, 1.0 - 1e-15);
    let (mut low, mut high) = (-10.0_f64, 10.0_f64);
    while high - low > 1e-9 {
        let mid = 0.5 * (low + high);
        if normal_cdf(mid) < p {
            low = mid
        } else {
            high = mid
        }
    }
    0.5 * (low + high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    #[test]
    fn normal_functions_match_known_values() {
        assert!((normal_cdf(0.0) - 0.5).abs() < 1e-7);
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-1.644_854) - 0.05).abs() < 1e-6);
        assert!((normal_quantile(0.975) - 1.959_964).abs() < 1e-5);
        assert!((normal_quantile(0.8) - 0.841_621).abs() < 1e-5);
        assert!((normal_quantile(0.5)).abs() < 1e-7);
    }

    #[test]
    fn wilson_interval_contains_the_rate_and_narrows_with_sample() {
        let small = Arm::new(100, 5).interval(0.95);
        let large = Arm::new(10_000, 500).interval(0.95);
        assert!(small.0 < 0.05 && 0.05 < small.1);
        assert!(large.0 < 0.05 && 0.05 < large.1);
        assert!(large.1 - large.0 < (small.1 - small.0) / 5.0);
        // Known value: 5/100 at 95% is about (0.0215, 0.1118).
        assert!((small.0 - 0.0215).abs() < 1e-3 && (small.1 - 0.1118).abs() < 1e-3);
        let zero = Arm::new(100, 0).interval(0.95);
        assert!(zero.0 < 1e-12);
        assert!(zero.1 > 0.0);
        assert_eq!(Arm::default().interval(0.95), (0.0, 1.0));
    }

    #[test]
    fn plans_match_the_textbook_fixed_horizon_and_ask_more_for_sequential() {
        let plan = plan(0.03, 0.015, 0.8, 0.95, 2).expect("a valid plan");
        // Two-proportion z-test, 3.0% vs 4.5%, alpha 0.05 two-sided, power 0.8: about 2,485.
        assert!(
            (2_450..=2_520).contains(&plan.fixed_horizon_per_variant),
            "{plan:?}"
        );
        assert!(plan.per_variant > plan.fixed_horizon_per_variant);
        assert!(
            plan.per_variant < 4 * plan.fixed_horizon_per_variant,
            "{plan:?}"
        );
        let three = super::plan(0.03, 0.015, 0.8, 0.95, 3).expect("a valid plan");
        assert!(
            three.per_variant > plan.per_variant,
            "more pairs need more sample"
        );
    }

    #[test]
    fn plans_refuse_what_cannot_be_planned() {
        assert_eq!(plan(0.0, 0.01, 0.8, 0.95, 2), Err(PlanError::Baseline));
        assert_eq!(plan(f64::NAN, 0.01, 0.8, 0.95, 2), Err(PlanError::Baseline));
        assert_eq!(plan(0.5, 0.6, 0.8, 0.95, 2), Err(PlanError::Effect));
        assert_eq!(plan(0.5, -0.1, 0.8, 0.95, 2), Err(PlanError::Effect));
        assert_eq!(plan(0.5, 0.1, 1.0, 0.95, 2), Err(PlanError::Power));
        assert_eq!(plan(0.5, 0.1, 0.8, 0.3, 2), Err(PlanError::Confidence));
        assert_eq!(plan(0.5, 0.1, 0.8, 0.95, 9), Err(PlanError::Variants));
        assert_eq!(plan(0.5, 1e-7, 0.8, 0.95, 2), Err(PlanError::TooSmall));
    }

    #[test]
    fn pair_indexes_cover_every_pair_once() {
        for k in 2..=8 {
            let mut seen = vec![false; k * (k - 1) / 2];
            for i in 0..k {
                for j in i + 1..k {
                    let at = pair_index(k, i, j);
                    assert!(!seen[at]);
                    seen[at] = true;
                }
            }
            assert!(seen.iter().all(|s| *s));
        }
    }

    #[test]
    fn no_decision_below_the_minimum_sample() {
        let rule = DecisionRule {
            alpha: 0.05,
            tau: 0.015,
            min_sample: 0,
        };
        let mut state = SequentialState::new(2);
        let verdict = state.observe(&[Arm::new(99, 0), Arm::new(99, 99)], &rule);
        assert_eq!(verdict, Verdict::NeedsSample);
    }

    #[test]
    fn an_overwhelming_difference_wins_and_the_loser_never_does() {
        let rule = DecisionRule {
            alpha: 0.05,
            tau: 0.015,
            min_sample: 100,
        };
        let mut state = SequentialState::new(3);
        let arms = [
            Arm::new(5_000, 150),
            Arm::new(5_000, 400),
            Arm::new(5_000, 160),
        ];
        match state.observe(&arms, &rule) {
            Verdict::Winner { index, p_value } => {
                assert_eq!(index, 1);
                assert!(p_value <= 0.05 / 3.0);
            }
            other => panic!("expected a winner, got {other:?}"),
        }
        // The pair 0–2 shows no difference.
        assert!(state.pair(0, 2).0 > 0.05);
        assert!(state.pair(1, 0).1);
        assert!(!state.pair(0, 1).1);
    }

    /// One simulated test under the job's looking schedule: everyone is sent at once, each
    /// recipient clicks with their variant's probability after an exponential delay (mean
    /// `mean_delay_looks` looks), and the rule looks once per evaluation until a winner or the
    /// last look. Returns the winner, if any.
    fn simulate(
        rng: &mut StdRng,
        rates: &[f64],
        per_variant: u64,
        rule: &DecisionRule,
    ) -> Option<usize> {
        const LOOKS: usize = 288; // every 5 minutes for a day
        let mean_delay_looks = 24.0; // clicks arrive over about two hours
        let mut arrivals: Vec<Vec<usize>> = rates
            .iter()
            .map(|&rate| {
                // The recipients who click, by geometric gaps between them (a draw per clicker,
                // not per recipient), each with an exponential delay.
                let mut looks = Vec::new();
                let mut next = 0u64;
                loop {
                    let u: f64 = rng.random();
                    next += ((1.0 - u).ln() / (1.0 - rate).ln()).floor() as u64;
                    if next >= per_variant {
                        break;
                    }
                    next += 1;
                    let u: f64 = rng.random();
                    looks.push((-mean_delay_looks * (1.0 - u).ln()).floor() as usize);
                }
                looks.sort_unstable();
                looks
            })
            .collect();
        let mut state = SequentialState::new(rates.len());
        let mut cursor = vec![0usize; rates.len()];
        for look in 0..LOOKS {
            let arms: Vec<Arm> = arrivals
                .iter_mut()
                .zip(cursor.iter_mut())
                .map(|(times, seen)| {
                    while *seen < times.len() && times[*seen] <= look {
                        *seen += 1;
                    }
                    Arm::new(per_variant, *seen as u64)
                })
                .collect();
            if let Verdict::Winner { index, .. } = state.observe(&arms, rule) {
                return Some(index);
            }
        }
        None
    }

    fn calibration_runs() -> usize {
        2_000
    }

    /// No true difference: a winner in at most 5% of tests, despite 288 looks each.
    #[test]
    fn calibration_no_difference_rarely_declares_a_winner() {
        let rule = DecisionRule {
            alpha: 0.05,
            tau: 0.015,
            min_sample: 100,
        };
        for (case, rates) in [
            ("two variants", vec![0.03, 0.03]),
            ("three variants", vec![0.03; 3]),
        ] {
            let planned = plan(0.03, 0.015, 0.8, 0.95, rates.len())
                .expect("plan")
                .per_variant;
            let mut rng = StdRng::seed_from_u64(20261206);
            let runs = calibration_runs();
            let winners = (0..runs)
                .filter(|_| simulate(&mut rng, &rates, planned, &rule).is_some())
                .count();
            let rate = winners as f64 / runs as f64;
            println!(
                "calibration, no difference, {case}: false winners {rate:.4} ({winners}/{runs}, n={planned}/variant)"
            );
            assert!(rate <= 0.05, "false-winner rate {rate} above 5% ({case})");
        }
    }

    /// A true 3.0% vs 4.5% click rate at the planned sample: the right winner in at least 80% of
    /// tests, the wrong one in at most 1%.
    #[test]
    fn calibration_a_true_effect_is_found_at_the_planned_sample() {
        let planned = plan(0.03, 0.015, 0.8, 0.95, 2).expect("plan").per_variant;
        let rule = DecisionRule {
            alpha: 0.05,
            tau: 0.015,
            min_sample: 100,
        };
        let mut rng = StdRng::seed_from_u64(4_500);
        let runs = calibration_runs();
        let (mut right, mut wrong) = (0, 0);
        for _ in 0..runs {
            match simulate(&mut rng, &[0.03, 0.045], planned, &rule) {
                Some(1) => right += 1,
                Some(_) => wrong += 1,
                None => {}
            }
        }
        let (right_rate, wrong_rate) = (right as f64 / runs as f64, wrong as f64 / runs as f64);
        println!(
            "calibration, 3.0% vs 4.5% at n={planned}/variant: right {right_rate:.4}, wrong {wrong_rate:.4}"
        );
        assert!(
            right_rate >= 0.80,
            "right-winner rate {right_rate} below 80%"
        );
        assert!(
            wrong_rate <= 0.01,
            "wrong-winner rate {wrong_rate} above 1%"
        );
    }
}
