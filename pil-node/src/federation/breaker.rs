//! A circuit breaker per peer: after repeated failures a peer is not called for a
//! while, so a dead region costs nothing instead of a timeout per lookup; one trial
//! call after the cool-down decides whether to close again.

use std::time::{Duration, Instant};

/// Longest cool-down, however long a peer stays down.
const MAX_COOLDOWN: Duration = Duration::from_secs(60);

/// The breaker's state, as operators see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down has passed.
    Open { retry_in: Duration },
    /// One trial call is allowed.
    HalfOpen,
}

/// Counts consecutive failures and opens after `threshold` of them.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    base_cooldown: Duration,
    failures: u32,
    cooldown: Duration,
    open_until: Option<Instant>,
    trial_in_flight: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            base_cooldown: cooldown,
            failures: 0,
            cooldown,
            open_until: None,
            trial_in_flight: false,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open {
                retry_in: until - now,
            },
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a call may go out now; `Err(retry_in)` when the circuit is open.
    pub fn allow(&mut self, now: Instant) -> Result<(), Duration> {
        match self.state(now) {
            BreakerState::Closed => Ok(()),
            BreakerState::Open { retry_in } => Err(retry_in),
            BreakerState::HalfOpen if self.trial_in_flight => Err(Duration::ZERO),
            BreakerState::HalfOpen => {
                self.trial_in_flight = true;
                Ok(())
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.cooldown = self.base_cooldown;
        self.open_until = None;
        self.trial_in_flight = false;
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        if self.trial_in_flight {
            // The trial failed: stay open, longer.
            self.cooldown = (self.cooldown * 2).min(MAX_COOLDOWN);
            self.open_until = Some(now + self.cooldown);
            self.trial_in_flight = false;
        } else if self.failures >= self.threshold {
            self.open_until = Some(now + self.cooldown);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_half_opens_after_cooldown() {
        let t0 = Instant::now();
        let mut b = Breaker::new(2, Duration::from_millis(100));
        assert!(b.allow(t0).is_ok());
        b.failure(t0);
        assert!(b.allow(t0).is_ok(), "one failure keeps it closed");
        b.failure(t0);
        assert!(matches!(b.state(t0), BreakerState::Open { .. }));
        assert!(b.allow(t0 + Duration::from_millis(50)).is_err());
        let later = t0 + Duration::from_millis(150);
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        assert!(b.allow(later).is_ok(), "one trial call");
        assert!(b.allow(later).is_err(), "only one");
        b.failure(later);
        // The cool-down doubled.
        assert!(b.allow(later + Duration::from_millis(150)).is_err());
        let much_later = later + Duration::from_millis(250);
        assert!(b.allow(much_later).is_ok());
        b.success();
        assert_eq!(b.state(much_later), BreakerState::Closed);
    }
}
