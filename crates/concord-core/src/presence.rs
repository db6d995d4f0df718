//! Lease arithmetic for presence (DESIGN §2 "Presence without a write per heartbeat").
//!
//! A hub answers heartbeats from memory and only writes the durable `lease_until`
//! ahead, to `now + 1.5 × TTL`, when less than one TTL of it remains. These functions
//! are the whole rule, so it is tested once here and cannot drift between backends.

/// Minimum and maximum instance TTL accepted (1 s .. 1 day).
pub const MIN_TTL_MS: i64 = 1_000;
pub const MAX_TTL_MS: i64 = 86_400_000;
pub const DEFAULT_TTL_MS: i64 = 15_000;

/// The durable lease written at registration or when it runs low.
pub fn write_ahead(now_ms: i64, ttl_ms: i64) -> i64 {
    now_ms.saturating_add(ttl_ms.saturating_mul(3) / 2)
}

/// Whether a heartbeat at `now_ms` must rewrite the durable lease.
pub fn needs_durable_write(now_ms: i64, durable_until_ms: i64, ttl_ms: i64) -> bool {
    durable_until_ms.saturating_sub(now_ms) < ttl_ms
}

/// When an instance whose last heartbeat was at `last_seen_ms` expires (memory view).
pub fn expires_at(last_seen_ms: i64, ttl_ms: i64) -> i64 {
    last_seen_ms.saturating_add(ttl_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn registration_lease_lasts_one_and_a_half_ttl() {
        assert_eq!(write_ahead(1_000, 15_000), 23_500);
    }

    proptest! {
        /// For any heartbeat schedule with gaps under one TTL, the durable lease
        /// never runs out before last heartbeat + TTL, and it is written at most
        /// about twice per TTL whatever the heartbeat rate.
        #[test]
        fn durable_lease_covers_memory_lease(
            ttl in MIN_TTL_MS..60_000i64,
            gaps in proptest::collection::vec(1i64..1_000, 1..400),
        ) {
            let mut now = 0i64;
            let mut durable = write_ahead(now, ttl);
            let mut writes = 0u64;
            for g in gaps {
                let gap = (g * ttl / 1_000).max(1).min(ttl - 1);
                now += gap;
                prop_assert!(durable >= now, "durable lease ran out before a heartbeat arrived");
                if needs_durable_write(now, durable, ttl) {
                    durable = write_ahead(now, ttl);
                    writes += 1;
                }
                prop_assert!(durable >= expires_at(now, ttl));
                prop_assert!(durable <= now + ttl * 3 / 2);
            }
            // At most one write per half TTL of elapsed time, plus the first.
            prop_assert!(writes <= (now / (ttl / 2).max(1)) as u64 + 1);
        }
    }
}
