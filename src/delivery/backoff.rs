//! Exponential backoff with full jitter.
//!
//! Input: the attempt number. Output: a delay drawn uniformly from zero to
//! `min(max, base × 2^attempt)`, so that many failing records do not retry in lock-step. Pure
//! apart from the random draw, which the caller supplies.

use std::time::Duration;

use rand::Rng;

/// A validated backoff policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
}

/// A policy that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("backoff base must be positive and not above the maximum")]
pub struct InvalidBackoff;

impl Backoff {
    /// A policy; `base` must be positive and not above `max`.
    pub fn try_new(base: Duration, max: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() || base > max {
            return Err(InvalidBackoff);
        }
        Ok(Backoff { base, max })
    }

    /// The ceiling for `attempt` (0 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        self.base.saturating_mul(factor).min(self.max)
    }

    /// A delay drawn with full jitter.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(0..=nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn ceiling_doubles_up_to_the_maximum() {
        let b = Backoff::try_new(Duration::from_secs(1), Duration::from_secs(10)).unwrap();
        let c: Vec<u64> = (0..6).map(|a| b.ceiling(a).as_secs()).collect();
        assert_eq!(c, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(b.ceiling(200), Duration::from_secs(10));
    }

    #[test]
    fn delays_stay_within_the_ceiling_and_spread_out() {
        let b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(60)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(3, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(800)));
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 150, "full jitter spreads retries");
    }

    #[test]
    fn delays_grow_with_the_attempt_averaging_half_the_ceiling() {
        let b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(60)).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let means: Vec<f64> = (0..5)
            .map(|attempt| {
                let total: f64 = (0..2000).map(|_| b.delay(attempt, &mut rng).as_secs_f64()).sum();
                total / 2000.0
            })
            .collect();
        for (attempt, mean) in means.iter().enumerate() {
            let half_ceiling = b.ceiling(attempt as u32).as_secs_f64() / 2.0;
            assert!(
                (mean / half_ceiling - 1.0).abs() < 0.1,
                "attempt {attempt}: mean {mean} s, expected about {half_ceiling} s"
            );
        }
        assert!(means.windows(2).all(|w| w[1] > w[0] * 1.6), "{means:?}");
    }

    #[test]
    fn invalid_policies_are_refused() {
        assert!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
    }
}
