//! Per-token rate limiting (token bucket, DESIGN §3): a flood from one token gets
//! 429 with Retry-After and leaves everyone else's budget untouched.

use concord_core::{Error, ErrorCode, Result};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use std::num::NonZeroU32;

pub struct Limits {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl Limits {
    /// `per_second == 0` disables the limit.
    pub fn new(per_second: u32, burst: u32) -> Limits {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        Limits { limiter }
    }

    pub fn check(&self, token_id: &str) -> Result<()> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        match l.check_key(&token_id.to_string()) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                let ms = wait.as_millis().max(1) as u64;
                Err(Error::new(
                    ErrorCode::RateLimited,
                    format!("rate limit exceeded for token {token_id}; retry in {ms} ms"),
                )
                .with_details(json!({ "retry_after_ms": ms })))
            }
        }
    }

    /// Drops idle buckets so the map does not grow with every token ever seen.
    pub fn shrink(&self) {
        if let Some(l) = &self.limiter {
            l.retain_recent();
        }
    }
}
