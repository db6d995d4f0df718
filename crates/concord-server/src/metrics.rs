//! Prometheus text metrics. Hand-rolled counters: a handful of atomics and one map
//! per request outcome is all the hub needs, and it keeps the dependency tree small.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, String, u16), u64>>,
    pub heartbeats_memory: AtomicU64,
    pub heartbeats_durable: AtomicU64,
    /// Bearer tokens resolved by the store (the auth cache did not have them).
    pub token_lookups: AtomicU64,
    pub instances_expired: AtomicU64,
    pub panics: AtomicU64,
}

impl Metrics {
    pub fn record(&self, method: &str, route: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((method.to_string(), route.to_string(), status))
                .or_insert(0) += 1;
        }
    }

    /// The hub's own counters, then the counters and the gauges kept elsewhere
    /// (the store's, the limits'), each as `(name, help, value)`.
    pub fn render(
        &self,
        kept_elsewhere: &[(&str, &str, f64)],
        gauges: &[(&str, &str, f64)],
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP concord_http_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE concord_http_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((method, route, status), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "concord_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {n}"
                );
            }
        }
        let counters = [
            (
                "concord_heartbeats_memory_total",
                "Heartbeats answered from memory.",
                &self.heartbeats_memory,
            ),
            (
                "concord_heartbeats_durable_total",
                "Heartbeats that wrote the durable lease.",
                &self.heartbeats_durable,
            ),
            (
                "concord_token_lookups_total",
                "Bearer tokens resolved by the store (not in the auth cache).",
                &self.token_lookups,
            ),
            (
                "concord_instances_expired_total",
                "Instances expired by this hub's reaper.",
                &self.instances_expired,
            ),
            (
                "concord_panics_total",
                "Handler panics caught and answered with 500.",
                &self.panics,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        for (name, help, v) in kept_elsewhere {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        for (name, help, v) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        out
    }
}
