//! Per-token rate limiting (token bucket, DESIGN §3): a flood from one token gets
//! 429 with Retry-After and leaves everyone else's budget untouched.

use concord_core::{Error, ErrorCode, Result};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde_json::json;
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

pub struct Limits {
    limiter: Option<DefaultKeyedRateLimiter<String>>,
    streams: Slots,
    long_polls: Slots,
    /// Observations per instance (DESIGN §8): a separate budget from requests.
    observers: Option<DefaultKeyedRateLimiter<String>>,
}

/// Counts open long-lived requests per token, so one token cannot hold every
/// connection the hub has. A std Mutex: held for a map update only.
#[derive(Clone)]
struct Slots {
    max: usize,
    what: &'static str,
    open: Arc<Mutex<HashMap<String, usize>>>,
}

/// Frees its slot when the request (or stream) ends, however it ends.
pub struct Slot {
    slots: Slots,
    token: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.slots.open.lock() {
            if let Some(n) = m.get_mut(&self.token) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.token);
                }
            }
        }
    }
}

impl Slots {
    fn take(&self, token: &str) -> Result<Slot> {
        let mut m = self
            .open
            .lock()
            .map_err(|_| Error::internal("slot table poisoned"))?;
        let n = m.entry(token.to_string()).or_insert(0);
        if *n >= self.max {
            return Err(Error::new(
                ErrorCode::RateLimited,
                format!(
                    "token {token} already has {} open {}; close one first",
                    self.max, self.what
                ),
            )
            .with_details(json!({ "retry_after_ms": 1000, "limit": self.max })));
        }
        *n += 1;
        Ok(Slot {
            slots: self.clone(),
            token: token.to_string(),
        })
    }

    fn total(&self) -> usize {
        self.open.lock().map(|m| m.values().sum()).unwrap_or(0)
    }
}

impl Limits {
    /// `per_second == 0` disables the limit.
    pub fn new(per_second: u32, burst: u32, max_streams: usize, max_long_polls: usize) -> Limits {
        let limiter = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(burst.max(per_second)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let slots = |max, what| Slots {
            max,
            what,
            open: Arc::new(Mutex::new(HashMap::new())),
        };
        Limits {
            limiter,
            streams: slots(max_streams, "event streams"),
            long_polls: slots(max_long_polls, "long-polls"),
            observers: None,
        }
    }

    /// Limits each instance to `per_second` observations (burst: two seconds' worth).
    pub fn with_observe_rate(mut self, per_second: u32) -> Limits {
        self.observers = NonZeroU32::new(per_second).map(|rate| {
            let burst = NonZeroU32::new(per_second.saturating_mul(2)).unwrap_or(rate);
            RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        self
    }

    /// Takes `n` observations from the instance's budget, or 429 naming it.
    pub fn observe(&self, instance: &str, n: usize) -> Result<()> {
        let Some(l) = &self.observers else {
            return Ok(());
        };
        let cells =
            NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        let limited = |ms: u64| {
            Err(Error::new(
                ErrorCode::RateLimited,
                format!("instance {instance} reports observations too fast; retry in {ms} ms"),
            )
            .with_details(json!({ "retry_after_ms": ms, "instance": instance })))
        };
        match l.check_key_n(&instance.to_string(), cells) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                limited(wait.as_millis().max(1) as u64)
            }
            Err(_) => limited(1000),
        }
    }

    /// A slot for an SSE stream, held for the stream's life.
    pub fn stream(&self, token_id: &str) -> Result<Slot> {
        self.streams.take(token_id)
    }

    /// A slot for a long-poll, held until it answers.
    pub fn long_poll(&self, token_id: &str) -> Result<Slot> {
        self.long_polls.take(token_id)
    }

    /// Open streams and long-polls, for /metrics.
    pub fn open_counts(&self) -> (usize, usize) {
        (self.streams.total(), self.long_polls.total())
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
        if let Some(l) = &self.observers {
            l.retain_recent();
        }
    }
}
