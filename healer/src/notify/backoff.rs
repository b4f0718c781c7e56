//! Backoff between attempts at the notification at the head of a receiver's queue: exponential with full
//! jitter (attempt `n`, counted from 0, waits a uniformly random time in `0..=min(max, initial × 2ⁿ)`), so
//! a receiver that comes back is not met by every Vigil at once, and one that stays down is tried at most
//! about once per `max`.

use std::time::Duration;

/// The upper bound of the wait after failed attempt `attempt` (from 0).
pub fn ceiling(attempt: u32, initial: Duration, max: Duration) -> Duration {
    // 2^31 × any initial is far past any max; saturate instead of overflowing.
    let factor = 2u32.checked_pow(attempt.min(31)).unwrap_or(u32::MAX);
    initial.checked_mul(factor).unwrap_or(max).min(max)
}

/// The wait after failed attempt `attempt`, given a uniform random `unit` in `[0, 1]`.
pub fn delay(attempt: u32, initial: Duration, max: Duration, unit: f64) -> Duration {
    let unit = if unit.is_nan() { 0.0 } else { unit.clamp(0.0, 1.0) };
    ceiling(attempt, initial, max).mul_f64(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_up_to_max() {
        let (initial, max) = (500 * MS, Duration::from_secs(60));
        let ceilings: Vec<Duration> = (0..10).map(|a| ceiling(a, initial, max)).collect();
        assert_eq!(ceilings[0], 500 * MS);
        assert_eq!(ceilings[1], 1000 * MS);
        assert_eq!(ceilings[6], 32_000 * MS);
        assert_eq!(ceilings[7], max, "64 s is capped at 60 s");
        assert_eq!(ceiling(u32::MAX, initial, max), max);
        assert_eq!(ceiling(40, Duration::from_secs(u64::MAX / 4), max), max, "no overflow");
    }

    #[test]
    fn delays_stay_within_zero_and_the_ceiling() {
        let (initial, max) = (500 * MS, Duration::from_secs(60));
        for attempt in 0..40 {
            let c = ceiling(attempt, initial, max);
            for unit in [0.0, 0.25, 0.5, 0.999, 1.0, -3.0, 7.0, f64::NAN] {
                let d = delay(attempt, initial, max, unit);
                assert!(d <= c && d <= max, "attempt {attempt} unit {unit}: {d:?} > {c:?}");
            }
        }
        assert_eq!(delay(2, initial, max, 0.5), 1000 * MS);
    }
}
