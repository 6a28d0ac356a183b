//! Who gets which variant: a deterministic function of (test id, customer id), so an allocation
//! can be recomputed anywhere (attribution, re-runs, a crashed scheduler) and always agrees with
//! the one stored at the start of the test.

/// Where one person of a test's audience goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// Receives variant `index` during the test.
    Variant(usize),
    /// Held back; receives the winner.
    Remainder,
}

/// Allocates `customer_id` in test `test_id` with `variants` variants (at least 1) sharing
/// `test_fraction` (0–1) of the audience evenly; everyone else is in the remainder.
pub fn allocate(
    test_id: &str,
    customer_id: &str,
    variants: usize,
    test_fraction: f64,
) -> Allocation {
    let u = unit_hash(test_id, customer_id);
    let fraction = if test_fraction.is_finite() {
        test_fraction.clamp(0.0, 1.0)
    } else {
        0.0
    };
    if variants == 0 || u >= fraction {
        return Allocation::Remainder;
    }
    let index = ((u / fraction) * variants as f64) as usize;
    Allocation::Variant(index.min(variants - 1))
}

/// A uniform number in [0, 1) from (test id, customer id): FNV-1a over both (separated by a NUL,
/// which neither may contain) then the splitmix64 finalizer for avalanche. Fixed forever: a
/// change would move people between variants of running tests.
fn unit_hash(test_id: &str, customer_id: &str) -> f64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    for byte in test_id
        .bytes()
        .chain(std::iter::once(0))
        .chain(customer_id.bytes())
    {
        h ^= u64::from(byte);
        h = h.wrapping_mul(PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_person_always_lands_in_the_same_place() {
        for id in ["a", "reader-42", "a/b c", ".."] {
            assert_eq!(allocate("t1", id, 3, 0.2), allocate("t1", id, 3, 0.2));
        }
        // Pinned values (computed independently): changing the hash would move people in
        // running tests.
        assert_eq!(unit_hash("test-1", "reader-1"), 0.895_768_217_299_606_2);
        assert_eq!(unit_hash("test-1", "reader-2"), 0.441_667_111_999_583_75);
    }

    #[test]
    fn shares_follow_the_fraction_and_split_evenly() {
        let people = 100_000;
        let mut counts = [0usize; 4];
        let mut remainder = 0usize;
        for n in 0..people {
            match allocate("test-7", &format!("reader-{n}"), 4, 0.2) {
                Allocation::Variant(i) => counts[i] += 1,
                Allocation::Remainder => remainder += 1,
            }
        }
        let expected = people as f64 * 0.05;
        for count in counts {
            // 5 standard deviations of a binomial(100k, 0.05) is about 345.
            assert!((count as f64 - expected).abs() < 350.0, "{counts:?}");
        }
        assert!((remainder as f64 - people as f64 * 0.8).abs() < 700.0);
    }

    #[test]
    fn different_tests_allocate_independently() {
        let same = (0..10_000)
            .filter(|n| {
                let id = format!("reader-{n}");
                allocate("test-a", &id, 2, 1.0) == allocate("test-b", &id, 2, 1.0)
            })
            .count();
        assert!((4_700..=5_300).contains(&same), "{same}");
    }

    #[test]
    fn odd_fractions_send_everyone_to_the_remainder_or_the_variants() {
        assert_eq!(allocate("t", "p", 3, 0.0), Allocation::Remainder);
        assert_eq!(allocate("t", "p", 3, f64::NAN), Allocation::Remainder);
        assert_eq!(allocate("t", "p", 0, 1.0), Allocation::Remainder);
        assert!(matches!(allocate("t", "p", 3, 1.0), Allocation::Variant(i) if i < 3));
        assert!(matches!(allocate("t", "p", 3, 7.0), Allocation::Variant(i) if i < 3));
    }
}
