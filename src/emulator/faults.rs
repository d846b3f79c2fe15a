//! Injected faults for tests: the fault settings in, a per-request decision out.
//!
//! Input is the current [`Faults`] and a random draw; output is what to do with one collect
//! request: answer normally, answer 5xx, answer 429, or drop the connection, after the added
//! latency. This module only decides: it never sleeps, answers or closes anything itself.

use serde::{Deserialize, Serialize};

/// Fault settings, all off by default. They apply to `POST /collect/json/{stream}` only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share (0 to 1) of collect requests answered 500, 502 or 503.
    pub error_rate: f64,
    /// Share (0 to 1) of collect requests answered 429 without `Retry-After`, as Lytics does.
    pub throttle_rate: f64,
    /// Delay added to every collect request, faulted or not.
    pub latency_ms: u64,
    /// Share (0 to 1) of collect requests whose connection is closed without any response.
    pub drop_rate: f64,
    /// Answer 400 to any collect request holding a record with `"_poison": true`, as Lytics
    /// answers a payload it cannot take (a poison record).
    pub reject_poison: bool,
    /// Share (0 to 1) of collect requests answered only after a further `slow_ms`: slow
    /// answers, which a relay with a shorter request timeout sees as timeouts.
    pub slow_rate: f64,
    /// The further delay of a slow answer, in milliseconds.
    pub slow_ms: u64,
}

impl Faults {
    /// Checks that every rate is a number between 0 and 1, naming the first that is not.
    pub fn validate(&self) -> Result<(), String> {
        for (name, rate) in [
            ("error_rate", self.error_rate),
            ("throttle_rate", self.throttle_rate),
            ("drop_rate", self.drop_rate),
            ("slow_rate", self.slow_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("`{name}` must be between 0 and 1, got {rate}"));
            }
        }
        Ok(())
    }

    /// The same settings with every rate forced into 0..=1 (NaN counts as 0).
    pub fn clamped(self) -> Self {
        let clamp = |rate: f64| {
            if rate.is_nan() { 0.0 } else { rate.clamp(0.0, 1.0) }
        };
        Faults {
            error_rate: clamp(self.error_rate),
            throttle_rate: clamp(self.throttle_rate),
            latency_ms: self.latency_ms,
            drop_rate: clamp(self.drop_rate),
            reject_poison: self.reject_poison,
            slow_rate: clamp(self.slow_rate),
            slow_ms: self.slow_ms,
        }
    }
}

/// What happens to one collect request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Handle it normally.
    Pass,
    /// Close the connection without answering.
    Drop,
    /// Answer with this server error status (500, 502 or 503).
    Error(u16),
    /// Answer 429.
    Throttle,
}

/// The delay added to one request: the latency of every request, and `slow_ms` more for a
/// slow answer.
pub fn delay_ms(faults: &Faults, rng: &mut impl rand::Rng) -> (u64, bool) {
    let slow = faults.slow_rate > 0.0 && rng.random_bool(faults.slow_rate.min(1.0));
    let extra = if slow { faults.slow_ms } else { 0 };
    (faults.latency_ms.saturating_add(extra), slow)
}

/// Decides one request's fate. The faults are drawn in turn (drop, then error, then throttle),
/// each with its own rate, so a rate of 1 always wins over the ones after it.
pub fn decide(faults: &Faults, rng: &mut impl rand::Rng) -> FaultAction {
    if faults.drop_rate > 0.0 && rng.random_bool(faults.drop_rate.min(1.0)) {
        return FaultAction::Drop;
    }
    if faults.error_rate > 0.0 && rng.random_bool(faults.error_rate.min(1.0)) {
        const STATUSES: [u16; 3] = [500, 502, 503];
        return FaultAction::Error(STATUSES[rng.random_range(0..STATUSES.len())]);
    }
    if faults.throttle_rate > 0.0 && rng.random_bool(faults.throttle_rate.min(1.0)) {
        return FaultAction::Throttle;
    }
    FaultAction::Pass
}

#[cfg(test)]
#[allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "a test should fail loudly at the broken step"
)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn decide_many(faults: Faults) -> Vec<FaultAction> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        (0..1000).map(|_| decide(&faults, &mut rng)).collect()
    }

    #[test]
    fn no_faults_by_default() {
        assert!(
            decide_many(Faults::default())
                .iter()
                .all(|a| *a == FaultAction::Pass)
        );
    }

    #[test]
    fn full_rates_always_fault_in_order() {
        let all = Faults {
            error_rate: 1.0,
            throttle_rate: 1.0,
            drop_rate: 1.0,
            latency_ms: 0,
            reject_poison: false,
            slow_rate: 0.0,
            slow_ms: 0,
        };
        assert!(decide_many(all).iter().all(|a| *a == FaultAction::Drop));
        let errors = decide_many(Faults {
            drop_rate: 0.0,
            ..all
        });
        assert!(
            errors
                .iter()
                .all(|a| matches!(a, FaultAction::Error(500 | 502 | 503)))
        );
        for status in [500, 502, 503] {
            assert!(errors.contains(&FaultAction::Error(status)));
        }
    }

    #[test]
    fn a_share_of_answers_comes_slow() {
        let faults = Faults {
            latency_ms: 5,
            slow_rate: 0.25,
            slow_ms: 1000,
            ..Faults::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let delays: Vec<(u64, bool)> = (0..1000).map(|_| delay_ms(&faults, &mut rng)).collect();
        let slow = delays.iter().filter(|(_, slow)| *slow).count();
        assert!((150..350).contains(&slow), "{slow}");
        assert!(delays.iter().all(|&(d, slow)| d == if slow { 1005 } else { 5 }));
        assert_eq!(delay_ms(&Faults::default(), &mut rng), (0, false));
    }

    #[test]
    fn partial_rates_fault_about_that_share() {
        let actions = decide_many(Faults {
            throttle_rate: 0.3,
            ..Faults::default()
        });
        let throttled = actions.iter().filter(|a| **a == FaultAction::Throttle).count();
        assert!((200..400).contains(&throttled), "{throttled}");
    }

    #[test]
    fn validation_rejects_rates_outside_zero_to_one() {
        let bad = Faults {
            drop_rate: 1.5,
            ..Faults::default()
        };
        assert_eq!(
            bad.validate(),
            Err("`drop_rate` must be between 0 and 1, got 1.5".to_string())
        );
        assert_eq!(bad.clamped().drop_rate, 1.0);
        assert!(Faults::default().validate().is_ok());
    }
}
