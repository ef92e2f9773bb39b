//! Per-user token buckets for commands: every connection of a user on this
//! gateway draws from the same bucket, so opening more sockets does not buy
//! a higher rate. Buckets that are full again are forgotten by [`RateLimiter::sweep`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket per key: `rate` tokens a second up to `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate_per_s: f64, burst: f64) -> Self {
        Self {
            rate: rate_per_s,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `key` if there is one.
    pub fn try_acquire(&self, key: &str) -> bool {
        self.try_acquire_at(key, Instant::now())
    }

    fn try_acquire_at(&self, key: &str, now: Instant) -> bool {
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket = buckets.entry(key.to_string()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets buckets that have refilled completely (their users are idle).
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        if let Ok(mut buckets) = self.buckets.lock() {
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst
            });
        }
    }

    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|b| b.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate() {
        let rl = RateLimiter::new(2.0, 3.0);
        let t0 = Instant::now();
        assert!(rl.try_acquire_at("a", t0));
        assert!(rl.try_acquire_at("a", t0));
        assert!(rl.try_acquire_at("a", t0));
        assert!(!rl.try_acquire_at("a", t0), "burst used up");
        assert!(rl.try_acquire_at("b", t0), "other users are not affected");
        assert!(!rl.try_acquire_at("a", t0 + Duration::from_millis(400)));
        assert!(
            rl.try_acquire_at("a", t0 + Duration::from_millis(500)),
            "refilled at 2/s"
        );
        assert!(!rl.try_acquire_at("a", t0 + Duration::from_millis(600)));
        // A long pause refills up to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(rl.try_acquire_at("a", later));
        }
        assert!(!rl.try_acquire_at("a", later));
    }

    #[test]
    fn sweep_forgets_full_buckets_only() {
        let rl = RateLimiter::new(1.0, 2.0);
        let t0 = Instant::now();
        assert!(rl.try_acquire_at("a", t0));
        assert!(rl.try_acquire_at("b", t0));
        rl.sweep_at(t0);
        assert_eq!(rl.tracked(), 2);
        rl.sweep_at(t0 + Duration::from_secs(5));
        assert_eq!(rl.tracked(), 0);
    }
}
