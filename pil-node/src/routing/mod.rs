//! Privacy-preserving routing: asking only the regions that may hold something about
//! a patient, without handing any region a list of another region's patients.
//!
//! A region summarizes the patients it holds anything for (pointers, blocks,
//! opt-outs) as a filter over *tokens* ([`tokens`]): an oblivious PRF of the
//! identifier under a key only that region holds. A home node learns the token of the
//! patient it looks up by an exchange in which the holding region sees neither the
//! identifier nor the token, and checks that region's [`summary`]: a region whose
//! summary is fresh and cannot hold the patient is not asked; one whose summary is
//! missing or older than the bound always is, so routing never misses a pointer to
//! save a request. A peer holding every summary it was sent cannot test identifiers
//! offline: without the region's key it cannot make tokens.
//!
//! [`publish`] is the region's side (its tokens and summary), [`router`] the home
//! node's (the peers' summaries, and which peers a lookup asks).

pub mod publish;
pub mod router;
pub mod summary;
pub mod tokens;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Instant,
};

/// Routing at one node: what it publishes (when it has a routing key) and how it
/// routes its own lookups.
pub struct Routing {
    pub publisher: Option<Arc<publish::Publisher>>,
    pub router: Arc<router::Router>,
    evaluations: Mutex<HashMap<String, Bucket>>,
}

/// A token bucket: `rate` a second, up to twice that at once.
struct Bucket {
    level: f64,
    at: Instant,
}

impl Routing {
    pub fn new(publisher: Option<Arc<publish::Publisher>>, router: Arc<router::Router>) -> Self {
        Self {
            publisher,
            router,
            evaluations: Mutex::default(),
        }
    }

    /// Whether `peer` may have `n` more tokens evaluated now, at `rate` a second.
    pub fn allow_evaluations(&self, peer: &str, n: usize, rate: u32) -> bool {
        let now = Instant::now();
        let mut buckets = self.evaluations.lock().unwrap_or_else(|e| e.into_inner());
        buckets
            .entry(peer.to_string())
            .or_insert_with(|| Bucket::full(rate, now))
            .take(n, rate, now)
    }
}

impl Bucket {
    fn full(rate: u32, now: Instant) -> Self {
        Self {
            level: 2.0 * f64::from(rate.max(1)),
            at: now,
        }
    }

    fn take(&mut self, n: usize, rate: u32, now: Instant) -> bool {
        let rate = f64::from(rate.max(1));
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * rate;
        self.level = (self.level + refill).min(2.0 * rate);
        self.at = now;
        if self.level >= n as f64 {
            self.level -= n as f64;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn evaluations_are_limited_to_their_rate_with_a_burst_of_twice_it() {
        let t0 = Instant::now();
        let mut bucket = Bucket::full(10, t0);
        assert!(bucket.take(20, 10, t0));
        assert!(!bucket.take(1, 10, t0));
        assert!(!bucket.take(2, 10, t0 + Duration::from_millis(100)));
        assert!(bucket.take(1, 10, t0 + Duration::from_millis(200)));
        // Never more than the burst, however long it waited.
        assert!(!bucket.take(21, 10, t0 + Duration::from_secs(60)));
    }
}
