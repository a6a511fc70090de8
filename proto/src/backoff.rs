//! The one backoff policy of Berth's retry loops (a failed pull on the
//! coordinator, a lost session on the agent), built on `backon`: delays
//! double from a base up to a cap, each drawn at random from the upper half
//! of its step, so many nodes retrying at once spread out.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Delays doubling from `base` to `max`, the n-th drawn from
/// `[d/2, d)` where `d = min(base·2ⁿ⁻¹, max)`; endless.
pub fn jittered(base: Duration, max: Duration) -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(base / 2)
        .with_max_delay(max / 2)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

/// The delay before attempt `attempt + 1` after `attempt` failures (1-based)
/// of [`jittered`]`(base, max)`.
pub fn delay_after(base: Duration, max: Duration, attempt: u32) -> Duration {
    // Past 32 doublings every step is capped anyway.
    let n = attempt.clamp(1, 32) - 1;
    jittered(base, max).nth(n as usize).unwrap_or(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_to_the_cap_each_in_the_upper_half_of_its_step() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..50 {
            let d: Vec<Duration> = jittered(base, max).take(10).collect();
            assert!(d[0] >= base / 2 && d[0] < base, "{d:?}");
            assert!(d[2] >= base * 2 && d[2] < base * 4, "{d:?}");
            assert!(d[9] >= max / 2 && d[9] < max, "{d:?}");
            let late = delay_after(base, max, 1000);
            assert!(late >= max / 2 && late < max);
            assert!(delay_after(base, max, 1) < base);
        }
    }
}
