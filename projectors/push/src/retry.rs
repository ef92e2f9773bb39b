//! The retry schedule: exponential backoff with full jitter, a provider's
//! `Retry-After` honoured as a floor, both capped.

use std::time::Duration;

/// Delay before attempt `attempt + 1`, after attempt `attempt` (from 1)
/// failed: uniform in [base·2^(attempt-1) / 2, base·2^(attempt-1)] (jitter
/// on the upper half, so a delay never collapses to 0), at least
/// `retry_after`, at most `max`. `unit` in [0, 1) is the random draw.
pub fn delay(
    attempt: u32,
    base: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let ceiling = exp.min(max);
    let jittered = ceiling.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => jittered
            .max(ra)
            .min(max.max(ra.min(Duration::from_secs(3600)))),
        None => jittered,
    }
}

/// A random draw in [0, 1).
pub fn unit() -> f64 {
    use rand_core::{OsRng, RngCore};
    (OsRng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_jitters_caps_and_honours_retry_after() {
        let (b, m) = (Duration::from_millis(100), Duration::from_secs(10));
        assert_eq!(delay(1, b, m, None, 0.0), Duration::from_millis(50));
        assert_eq!(delay(1, b, m, None, 1.0), Duration::from_millis(100));
        assert_eq!(delay(4, b, m, None, 1.0), Duration::from_millis(800));
        assert_eq!(delay(30, b, m, None, 1.0), m);
        assert_eq!(
            delay(1, b, m, Some(Duration::from_secs(2)), 0.0),
            Duration::from_secs(2)
        );
        let d = delay(3, b, m, None, unit());
        assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
    }
}
