//! Write budgets: a token bucket per writer, so no member can keep the broker from serving
//! the others.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// Token buckets of writes, one per writer: a member cluster, or one join token (clusters
/// and their readers share their cluster's; the admin is not limited).
#[derive(Debug)]
pub struct WriteRate {
    pub per_second: u32,
    pub burst: u32,
    buckets: Mutex<std::collections::HashMap<String, (f64, Instant)>>,
}

impl WriteRate {
    /// `per_second` sustained, `burst` at once (each at least 1).
    #[must_use]
    pub fn new(per_second: u32, burst: u32) -> Self {
        Self { per_second: per_second.max(1), burst: burst.max(1), buckets: Mutex::default() }
    }

    /// Takes one token for `key` at `now`, or says how long until one is there.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((f64::from(self.burst), now));
        let refill = now.saturating_duration_since(*last).as_secs_f64() * f64::from(self.per_second);
        *tokens = (*tokens + refill).min(f64::from(self.burst));
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / f64::from(self.per_second.max(1))))
        }
    }
}

/// Default write budget per writer: far above a gateway's heartbeat every 10 s and a burst of
/// exports at start, far below what would keep the broker from serving the others.
pub const DEFAULT_WRITES_PER_SECOND: u32 = 50;
pub const DEFAULT_WRITE_BURST: u32 = 200;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_sustained_rate_per_writer() {
        let rate = WriteRate::new(10, 3);
        let t0 = Instant::now();
        for _ in 0..3 {
            rate.take("a", t0).unwrap();
        }
        let wait = rate.take("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        // Another writer has its own bucket.
        rate.take("b", t0).unwrap();
        // 100 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        rate.take("a", t1).unwrap();
        assert!(rate.take("a", t1).is_err());
    }
}
