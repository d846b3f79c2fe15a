//! Per-integration limit on collect calls in flight: additive increase, multiplicative decrease.
//!
//! Input: the delivery tasks holding a slot of the integration (a task makes its calls one at a
//! time, so each holds at most one call in flight) and the outcome of each call: whether Lytics
//! throttled it (429) or took it. Output: how many calls an integration may have in flight. A 429 halves the limit (never below one); each
//! successful call raises it by one over the current limit, so it grows by about one call per
//! round trip back up to the configured maximum. Pure state, no clock.

/// The limit of one integration.
#[derive(Debug, Clone, PartialEq)]
pub struct Aimd {
    limit: f64,
    max: f64,
    in_flight: usize,
}

impl Aimd {
    /// Starts at the maximum.
    pub fn new(max: usize) -> Self {
        let max = max.max(1) as f64;
        Aimd {
            limit: max,
            max,
            in_flight: 0,
        }
    }

    /// Calls allowed in flight now.
    pub fn limit(&self) -> usize {
        self.limit.floor() as usize
    }

    /// Delivery tasks holding a slot now.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// True when no further call may start.
    pub fn saturated(&self) -> bool {
        self.in_flight >= self.limit()
    }

    /// A delivery task takes a slot (before it makes its calls).
    pub fn hold(&mut self) {
        self.in_flight += 1;
    }

    /// A delivery task is done with its slot.
    pub fn release(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A call ended; `throttled` when Lytics answered 429, `success` when it delivered.
    pub fn answered(&mut self, throttled: bool, success: bool) {
        if throttled {
            self.limit = (self.limit / 2.0).max(1.0);
        } else if success {
            self.limit = (self.limit + 1.0 / self.limit).min(self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttling_halves_and_success_climbs_back() {
        let mut a = Aimd::new(8);
        assert_eq!(a.limit(), 8);
        for _ in 0..5 {
            a.answered(true, false);
        }
        assert_eq!(a.limit(), 1, "halved down to the floor of one");
        let mut steps = 0;
        while a.limit() < 8 {
            a.answered(false, true);
            steps += 1;
            assert!(steps < 100);
        }
        assert!(steps > 7, "the increase is additive: {steps} successes");
        a.answered(false, true);
        assert_eq!(a.limit(), 8, "never above the maximum");
    }

    #[test]
    fn saturation_follows_calls_in_flight() {
        let mut a = Aimd::new(2);
        a.hold();
        assert!(!a.saturated());
        a.hold();
        assert!(a.saturated());
        a.answered(false, false);
        assert!(a.saturated(), "an answer does not free the slot");
        a.release();
        assert!(!a.saturated());
    }
}
